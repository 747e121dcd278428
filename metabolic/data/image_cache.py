"""Image datasets decoded once: every rank memory-maps raw pixels instead of decoding them.

A Hugging Face image dataset (data.source=hf) holds encoded images (PNG, JPEG) in Arrow files.
Decoding every image at every start, on every rank, into each rank's memory costs minutes and
one copy of the decoded set per rank, which at ImageNet's size does not fit at all. Instead
rank 0 decodes each split once, one piece at a time, into a flat file of uint8 pixels
[N, C, H, W] (row i is sample i), a file of int64 labels and a JSON record of the shape, the
class count and, for the training split, the per-channel pixel mean and std that normalise
both splits. Every rank maps the pixels read-only: the ranks of a machine share one copy in the
page cache, and a batch reads only its own rows.

Files are named by a key over the dataset's local files (names, sizes, modification times) or hub
name, the split and the two columns; runs sharing data.cache_dir take turns and never replace
a finished file (file_cache.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from metabolic.data import file_cache
from metabolic.data.arrays import ImageArrays, PixelStats
from metabolic.data.file_cache import Progress, digest, log, write_record
from metabolic.data.hf import decoded_chunks, num_classes, open_hf_split
from metabolic.data.idx import DatasetMissingError
from metabolic.engine.config import ConfigError

FORMAT = 1
"""Bump when the file layout changes: the key includes it, so old files are not read."""


def cache_key(source: dict, split: str, image_key: str, label_key: str, size: Optional[int] = None) -> str:
    """Key of a split's files for `source` (file_cache.dataset_source), resized to `size` or not."""
    return digest({"format": FORMAT, "source": source, "split": split, "image_key": image_key,
                   "label_key": label_key, "size": size})


def paths(folder: Path, key: str) -> tuple[Path, Path, Path]:
    """(pixels, labels, JSON record) of `key` in `folder`."""
    return folder / f"{key}.images", folder / f"{key}.labels", folder / f"{key}.json"


def is_built(folder: Path, key: str) -> bool:
    """Whether a finished split for `key` is in `folder` (the record is written last)."""
    return all(p.is_file() for p in paths(folder, key))


def prepare(folder: Path, key: str, dataset: Callable[[], object], split: str, image_key: str = "image",
            label_key: str = "label", size: Optional[int] = None, describe: str = "the dataset",
            should_stop: Callable[[], bool] = lambda: False, threads: int = 0) -> None:
    """Make sure split `split` of `dataset()` (a datasets.Dataset, opened only when it must be
    decoded) is decoded into `folder` under `key`, taking turns with other processes and going
    on from where a stopped decode left off."""
    file_cache.prepare(folder, key, lambda: is_built(folder, key),
                       lambda: build(folder, key, dataset(), split, image_key, label_key, size, describe,
                                     should_stop, threads),
                       should_stop, f"decoding the {split} split of {describe}")
    for p in part_paths(folder, key):  # progress of a decode someone else finished first
        p.unlink(missing_ok=True)


def part_paths(folder: Path, key: str) -> tuple[Path, Path, Path]:
    """(pixels, labels, progress record) a stopped decode left: the first rows of the split's files."""
    return folder / f"{key}.images.part", folder / f"{key}.labels.part", folder / f"{key}.part.json"


def build(folder: Path, key: str, ds, split: str, image_key: str = "image", label_key: str = "label",
          size: Optional[int] = None, describe: str = "the dataset",
          should_stop: Callable[[], bool] = lambda: False, threads: int = 0) -> dict:
    """Decode split `split` of `ds` (resized to `size`, by `threads` threads, 0: chosen by the
    image size, see hf.decoded_chunks) into the files of `key`; returns its record.

    Prints a progress line every file_cache.PROGRESS_EVERY_S seconds; raises file_cache.Interrupted
    once `should_stop()` is true after a piece. What was decoded when it stops (or fails) is left
    in `part_paths`, and the next build takes it over and goes on from it. Decoding is
    deterministic, so any partial file of a key is a prefix of the finished one; a builder only
    ever writes under its own temporary names and puts them in place whole. A split another
    builder finished meanwhile is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    images_path, labels_path, record_path = paths(folder, key)
    tmp_images, tmp_labels = file_cache.tmp_name(images_path), file_cache.tmp_name(labels_path)
    source = {"rows_total": len(ds), "fingerprint": getattr(ds, "_fingerprint", None)}
    done = _take_over(folder, key, tmp_images, tmp_labels, source)
    n, top = (done["rows"], done["top"]) if done else (0, -1)
    log(f"decoding the {split} split of {describe} ({len(ds):,} images) into {images_path} "
        + (f"from image {n:,}, where a stopped decode left off" if done else
           "(once; later runs and ranks memory-map it)"))
    progress, stats = Progress(), PixelStats.from_state(done["stats"]) if done else PixelStats()
    layout = tuple(done["layout"]) if done else None
    sample_shape = tuple(done["sample_shape"]) if done else None
    if done:
        _check_space(folder, (len(ds) - n) * int(np.prod(sample_shape)), f"the {split} split of {describe}")
    pieces = decoded_chunks(ds, split, image_key, label_key, size=size, workers=threads, start=n, layout=layout)
    start, safe = n, (n, top, stats.state())  # what a stop may keep: updated in one assignment per piece
    try:
        with open(tmp_images, "r+b" if done else "wb") as fi, open(tmp_labels, "r+b" if done else "wb") as fl, \
                contextlib.closing(pieces):
            fi.seek(0, os.SEEK_END), fl.seek(0, os.SEEK_END)
            try:
                for piece in pieces:  # a stop is looked for after each written piece: it is kept
                    if layout is None:
                        layout = piece.layout
                        _check_space(folder, len(ds) * piece.images[0].nbytes, f"the {split} split of {describe}")
                    _write(fi, piece.images, tmp_images)
                    _write(fl, piece.labels, tmp_labels)
                    sample_shape, n = piece.images.shape[1:], n + len(piece.labels)
                    top = max(top, int(piece.labels.max()))
                    if split == "train":
                        stats.add(torch.from_numpy(piece.images))
                    safe = (n, top, stats.state())  # a second Ctrl-C may land between any two lines above
                    if progress.due():
                        rate = (n - start) / max(progress.seconds, 1e-9)
                        log(f"decoding the {split} split of {describe}: {n:,} of {len(ds):,} images ({rate:,.0f}/s)")
                    if n < len(ds) and should_stop():
                        raise file_cache.Interrupted(
                            f"stopped while decoding the {split} split of {describe}; the {n:,} images decoded "
                            "so far are kept, the next run goes on from there")
            except BaseException as err:
                # What is written up to row n is right whatever stopped the decode (a stop, a second
                # Ctrl-C, a full disk), unless the data cannot be decoded as configured at all.
                rows, top_safe, stats_safe = safe
                if rows > 0 and not isinstance(err, ConfigError):
                    with contextlib.suppress(Exception):
                        _leave(folder, key, (fi, fl), (tmp_images, tmp_labels), rows, sample_shape,
                               {**source, "rows": rows, "top": top_safe, "layout": layout, "stats": stats_safe})
                raise
        file_cache.publish(tmp_labels, labels_path)
        file_cache.publish(tmp_images, images_path)
    finally:
        for p in (tmp_images, tmp_labels):
            p.unlink(missing_ok=True)
    mean, std = stats.result() if split == "train" else (None, None)
    record = {"format": FORMAT, "num_samples": n, "sample_shape": list(sample_shape or (1, 1, 1)),
              "num_classes": num_classes(ds, label_key, top), "mean": mean, "std": std,
              "source": describe, "split": split, "image_size": size, "seconds": round(progress.seconds, 3)}
    write_record(record_path, record)
    log(f"decoded the {split} split of {describe}: {n:,} images {tuple(record['sample_shape'])} "
        f"in {record['seconds']:.1f} s")
    return record


def _write(f, array: np.ndarray, path: Path) -> None:
    try:
        f.write(memoryview(array).cast("B"))  # no bytes copy of the piece
    except OSError as err:
        err.filename = err.filename or str(path)  # a full disk names the file it was writing (folder_ready)
        raise


def _leave(folder: Path, key: str, files, tmps, rows: int, sample_shape, progress: dict) -> None:
    """Put the first `rows` rows of this builder's files under the part names, then their record:
    a builder that takes them over sees the record only once the files it vouches for are there."""
    width = int(np.prod(sample_shape))
    for f, size in zip(files, (rows * width, rows * 8)):
        f.flush()
        f.truncate(size)
        os.fsync(f.fileno())
    images, labels, record = part_paths(folder, key)
    os.replace(tmps[0], images)
    os.replace(tmps[1], labels)
    write_record(record, {"format": FORMAT, "sample_shape": list(sample_shape), **progress}, replace=True)


def _take_over(folder: Path, key: str, tmp_images: Path, tmp_labels: Path, source: dict) -> Optional[dict]:
    """Claim what a stopped decode left, by renaming its record and files to this builder's own
    temporary names (only one builder can), truncated to the rows its record vouches for; None
    when there is nothing (usable) to go on from."""
    images, labels, record = part_paths(folder, key)
    mine = file_cache.tmp_name(record)
    try:
        os.rename(record, mine)
    except FileNotFoundError:
        return None
    try:
        done = json.loads(mine.read_text())
        os.rename(images, tmp_images)
        os.rename(labels, tmp_labels)
        rows, width = int(done["rows"]), int(np.prod(done["sample_shape"]))
        ok = (done["format"] == FORMAT and 0 < rows <= source["rows_total"] and
              all(done[k] == v for k, v in source.items()) and
              tmp_images.stat().st_size >= rows * width and tmp_labels.stat().st_size >= rows * 8 and
              {"top", "layout", "stats"} <= done.keys())
        if ok:
            PixelStats.from_state(done["stats"])  # a record that cannot be read back is not used
            os.truncate(tmp_images, rows * width)
            os.truncate(tmp_labels, rows * 8)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    finally:
        mine.unlink(missing_ok=True)
    if ok:
        return done
    for p in (tmp_images, tmp_labels):
        p.unlink(missing_ok=True)
    return None


def _check_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DatasetMissingError(f"decoding {what} needs about {need / 2**30:.1f} GiB, {folder} has "
                                  f"{free / 2**30:.1f} GiB free: free space, or set data.cache_dir to a larger disk")


def open_split(folder: Path, key: str) -> tuple[ImageArrays, dict]:
    """A finished split as ImageArrays on its memory-mapped pixels (read-only: nothing may write into
    `images`), with its record."""
    images_path, labels_path, record_path = paths(folder, key)
    record = json.loads(record_path.read_text())
    n, shape = int(record["num_samples"]), tuple(record["sample_shape"])
    pixels = file_cache.map_readonly(images_path, np.uint8, (n, *shape), record_path)
    labels = np.array(file_cache.map_readonly(labels_path, np.int64, (n,), record_path))
    with warnings.catch_warnings():  # torch would copy nothing, and nothing writes into the pixels
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        images = torch.from_numpy(pixels)
    return ImageArrays(images, torch.from_numpy(labels), num_classes=int(record["num_classes"])), record


def prepare_splits(data, run_dir: Path, should_stop: Callable[[], bool] = lambda: False) -> dict[str, str]:
    """Rank 0: both splits of a source=hf DataConfig decoded into the image cache when missing;
    returns {split: key}."""
    folder, config_key = image_folder(data, run_dir)
    source = file_cache.dataset_source(data.path, data.hf_name, exclude=(folder, run_dir))
    where = f"'{data.path}'" if data.path and Path(data.path).exists() else f"'{data.hf_name or data.path}'"
    keys = {}
    with file_cache.folder_ready(folder, config_key, shared=bool(data.cache_dir), reads_from=data.path):
        for split in ("train", "test"):
            keys[split] = cache_key(source, split, data.image_key, data.label_key, data.image_size)
            prepare(folder, keys[split],
                    lambda s=split: open_hf_split(s, data.path, data.hf_name, data.image_key, data.label_key),
                    split, data.image_key, data.label_key, data.image_size, where, should_stop,
                    data.decode_threads)
    return keys


def image_folder(data, run_dir: Path) -> tuple[Path, str]:
    """(folder of the decoded splits, the config key that names it)."""
    return file_cache.folder_of(data.cache_dir, run_dir, "images")


def load_splits(data, run_dir: Path, keys: dict[str, str]) -> tuple[ImageArrays, ImageArrays, tuple]:
    """Every rank: (train, test, the training split's (mean, std)) from what rank 0 decoded."""
    folder, config_key = image_folder(data, run_dir)
    file_cache.wait_visible(lambda: all(is_built(folder, k) for k in keys.values()), folder, config_key,
                            "decoded the images")
    (train, record), (test, _) = (open_split(folder, keys[s]) for s in ("train", "test"))
    return train, test, (tuple(record["mean"]), tuple(record["std"]))
