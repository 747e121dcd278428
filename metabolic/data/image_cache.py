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
from metabolic.data.file_cache import Progress, digest, log, write_record, writing
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
    decoded) is decoded into `folder` under `key`, taking turns with other processes."""
    file_cache.prepare(folder, key, lambda: is_built(folder, key),
                       lambda: build(folder, key, dataset(), split, image_key, label_key, size, describe, should_stop,
                                     threads),
                       should_stop, f"decoding the {split} split of {describe}")


def build(folder: Path, key: str, ds, split: str, image_key: str = "image", label_key: str = "label",
          size: Optional[int] = None, describe: str = "the dataset",
          should_stop: Callable[[], bool] = lambda: False, threads: int = 0) -> dict:
    """Decode split `split` of `ds` (resized to `size`, by `threads` threads, 0: chosen by the
    image size, see hf.decoded_chunks) into the files of `key`; returns its record.

    Prints a progress line every file_cache.PROGRESS_EVERY_S seconds; raises file_cache.Interrupted
    (removing what it wrote) once `should_stop()` is true. A split another builder finished
    meanwhile is kept, not replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    images_path, labels_path, record_path = paths(folder, key)
    log(f"decoding the {split} split of {describe} ({len(ds):,} images) into {images_path} "
        "(once; later runs and ranks memory-map it)")
    progress, stats = Progress(), PixelStats()
    n, shape, top = 0, None, -1
    pieces = decoded_chunks(ds, split, image_key, label_key, size=size, workers=threads)
    with writing(images_path) as tmp_images, writing(labels_path) as tmp_labels, \
            open(tmp_images, "wb") as fi, open(tmp_labels, "wb") as fl, contextlib.closing(pieces):
        for images, labels in pieces:
            if n == 0:
                _check_space(folder, len(ds) * images[0].nbytes, f"the {split} split of {describe}")
            if should_stop():
                raise file_cache.Interrupted(f"stopped while decoding the {split} split of {describe}; "
                                             "nothing was kept")
            fi.write(memoryview(images).cast("B"))  # no bytes copy of the piece
            fl.write(memoryview(labels).cast("B"))
            shape, n = images.shape[1:], n + images.shape[0]
            top = max(top, int(labels.max()))
            if split == "train":
                stats.add(torch.from_numpy(images))
            if progress.due():
                log(f"decoding the {split} split of {describe}: {n:,} of {len(ds):,} images "
                    f"({n / max(progress.seconds, 1e-9):,.0f} images/s)")
    mean, std = stats.result() if split == "train" else (None, None)
    record = {"format": FORMAT, "num_samples": n, "sample_shape": list(shape or (1, 1, 1)),
              "num_classes": num_classes(ds, label_key, top), "mean": mean, "std": std,
              "source": describe, "split": split, "image_size": size, "seconds": round(progress.seconds, 3)}
    write_record(record_path, record)
    log(f"decoded the {split} split of {describe}: {n:,} images {tuple(record['sample_shape'])} "
        f"in {record['seconds']:.1f} s")
    return record


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
