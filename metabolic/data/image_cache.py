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
    decoded) is decoded into `folder` under `key`, taking turns with other processes; the holder
    of the folder's lock keeps a stopped decode's progress and goes on from it."""
    file_cache.prepare(folder, key, lambda: is_built(folder, key),
                       lambda held: build(folder, key, dataset(), split, image_key, label_key, size, describe,
                                          should_stop, threads, resumable=held),
                       should_stop, f"decoding the {split} split of {describe}")


def part_paths(folder: Path, key: str) -> tuple[Path, Path, Path]:
    """(pixels, labels, progress record) of a decode that was stopped part-way."""
    return folder / f"{key}.images.part", folder / f"{key}.labels.part", folder / f"{key}.part.json"


def build(folder: Path, key: str, ds, split: str, image_key: str = "image", label_key: str = "label",
          size: Optional[int] = None, describe: str = "the dataset",
          should_stop: Callable[[], bool] = lambda: False, threads: int = 0, resumable: bool = False) -> dict:
    """Decode split `split` of `ds` (resized to `size`, by `threads` threads, 0: chosen by the
    image size, see hf.decoded_chunks) into the files of `key`; returns its record.

    Prints a progress line every file_cache.PROGRESS_EVERY_S seconds; raises file_cache.Interrupted
    once `should_stop()` is true. `resumable` (only for the holder of the folder's lock): a stop
    keeps what was decoded, in `part_paths`, and the next build goes on from it; else a stop or
    a failure removes what was written. A split another builder finished meanwhile is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    images_path, labels_path, record_path = paths(folder, key)
    parts = part_paths(folder, key)
    done = _resumed(*parts, len(ds)) if resumable else None
    tmp_images, tmp_labels = parts[:2] if resumable else (file_cache.tmp_name(images_path),
                                                          file_cache.tmp_name(labels_path))
    n, top = (done["rows"], done["top"]) if done else (0, -1)
    log(f"decoding the {split} split of {describe} ({len(ds):,} images) into {images_path} "
        + (f"from image {n:,}, where a stopped decode left off" if done else
           "(once; later runs and ranks memory-map it)"))
    progress, stats = Progress(), PixelStats.from_state(done["stats"]) if done else PixelStats()
    layout = tuple(done["layout"]) if done else None
    sample_shape = tuple(done["sample_shape"]) if done else None
    pieces = decoded_chunks(ds, split, image_key, label_key, size=size, workers=threads, start=n, layout=layout)
    kept = False
    try:
        with open(tmp_images, "r+b" if done else "wb") as fi, open(tmp_labels, "r+b" if done else "wb") as fl, \
                contextlib.closing(pieces):
            for f, width in ((fi, int(np.prod(done["sample_shape"])) if done else 0), (fl, 8)):
                f.truncate(n * width)  # what the progress record vouches for; a kill may have written more
                f.seek(n * width)
            for piece in pieces:  # a stop is looked for after each piece is written: it is kept
                if layout is None:
                    layout = piece.layout
                    _check_space(folder, len(ds) * piece.images[0].nbytes, f"the {split} split of {describe}")
                fi.write(memoryview(piece.images).cast("B"))  # no bytes copy of the piece
                fl.write(memoryview(piece.labels).cast("B"))
                sample_shape, n = piece.images.shape[1:], n + len(piece.labels)
                top = max(top, int(piece.labels.max()))
                if split == "train":
                    stats.add(torch.from_numpy(piece.images))
                if progress.due():
                    log(f"decoding the {split} split of {describe}: {n:,} of {len(ds):,} images "
                        f"({n / max(progress.seconds, 1e-9):,.0f} images/s)")
                if should_stop():
                    if resumable:
                        fi.flush(), fl.flush()
                        write_record(parts[2], {"format": FORMAT, "rows": n, "top": top, "layout": layout,
                                                "sample_shape": list(sample_shape), "stats": stats.state()})
                        kept = True
                    raise file_cache.Interrupted(
                        f"stopped while decoding the {split} split of {describe}; " +
                        (f"the {n:,} images decoded so far are kept, the next run goes on from there"
                         if kept else "nothing was kept"))
        file_cache.publish(tmp_labels, labels_path)
        file_cache.publish(tmp_images, images_path)
    finally:
        if not kept:
            for p in (tmp_images, tmp_labels, parts[2]):
                p.unlink(missing_ok=True)
    mean, std = stats.result() if split == "train" else (None, None)
    record = {"format": FORMAT, "num_samples": n, "sample_shape": list(sample_shape or (1, 1, 1)),
              "num_classes": num_classes(ds, label_key, top), "mean": mean, "std": std,
              "source": describe, "split": split, "image_size": size, "seconds": round(progress.seconds, 3)}
    write_record(record_path, record)
    log(f"decoded the {split} split of {describe}: {n:,} images {tuple(record['sample_shape'])} "
        f"in {record['seconds']:.1f} s")
    return record


def _resumed(images: Path, labels: Path, progress: Path, total: int) -> Optional[dict]:
    """What a stopped decode left (its progress record), when its files hold at least that much;
    else None, and any partial files are removed (a decode killed without a record)."""
    try:
        done = json.loads(progress.read_text())
        width = int(np.prod(done["sample_shape"]))
        ok = (done.get("format") == FORMAT and 0 < done["rows"] <= total
              and images.stat().st_size >= done["rows"] * width and labels.stat().st_size >= done["rows"] * 8)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if ok:
        return done
    for p in (images, labels, progress):
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
    with file_cache.folder_ready(folder, config_key, shared=bool(data.cache_dir)):
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
