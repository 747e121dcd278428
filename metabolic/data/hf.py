"""Image classification data from Hugging Face `datasets`: a hub name, or local files.

Hub loading is real code for users with a network; tests use local files only.
"""

from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from metabolic.data.arrays import ImageArrays
from metabolic.data.idx import DatasetMissingError
from metabolic.engine.config import ConfigError

CHUNK_ROWS = 1024
"""Most images decoded per piece (a few pieces are in memory at a time while a split is cached)."""
CHUNK_BYTES = 64 << 20
"""Most decoded bytes per piece (large images make pieces of fewer rows)."""
FIRST_ROWS = 16
"""Images of the first piece, which tells the size of the rest."""
MAX_THREADS = 8
"""Most decoding threads by default."""
THREADS_FROM_BYTES = 32 << 10
"""Decoded bytes per image from which threads pay (measured: 1.9x with 2 threads at 224 x 224 RGB,
even at 64 x 64 RGB, 0.7x at 28 x 28 grayscale)."""
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def load_saved(path: Path, split: str):
    """`split` of a datasets save_to_disk folder: a DatasetDict's split, or a lone Dataset as the
    train split; None when `path` is no such folder."""
    import datasets

    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
        if split not in splits:
            raise DatasetMissingError(f"config key 'data.path': '{path}' holds the splits {sorted(splits)}, "
                                      f"no '{split}'")
        return splits[split]
    if path.is_dir() and (path / "dataset_info.json").is_file() and split == "train":
        return datasets.load_from_disk(str(path))
    return None


def _load_local(path: Path, split: str):
    import datasets

    saved = load_saved(path, split)
    if saved is not None:
        return saved
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _FILE_BUILDERS and split in p.stem)
        if not files:
            raise DatasetMissingError(f"data.path '{path}' holds no {split} split "
                                      f"(expected a save_to_disk folder or *{split}*.parquet/csv/json files)")
        return datasets.load_dataset(_FILE_BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                     split="train")
    raise DatasetMissingError(f"data.path '{path}' does not exist")


def open_hf_split(split: str, path: Optional[str] = None, hub_name: Optional[str] = None,
                  image_key: str = "image", label_key: str = "label"):
    """A split as a `datasets.Dataset` from local files (preferred when present) or the hub, with
    its image and label columns checked."""
    if path and Path(path).exists():
        try:
            ds = _load_local(Path(path), split)
        except DatasetMissingError as err:
            if not hub_name:
                raise
            # local files win when present; say how to reach the hub instead
            raise DatasetMissingError(f"{err}; to load data.hf_name '{hub_name}' from the hub, "
                                      "set data.path=null") from err
    elif hub_name:
        import datasets

        try:
            ds = datasets.load_dataset(hub_name, split=split)
        except Exception as err:
            raise DatasetMissingError(f"could not load data.hf_name '{hub_name}' split '{split}' "
                                      f"from the hub ({type(err).__name__}: {err}); without a network, "
                                      f"save it with datasets' save_to_disk and set data.path") from err
    else:
        raise DatasetMissingError(f"data.path '{path}' does not exist and data.hf_name is not set")
    for key, name in ((image_key, "data.image_key"), (label_key, "data.label_key")):
        if key not in ds.column_names:
            raise ConfigError(f"config key '{name}': column '{key}' not in dataset columns {ds.column_names}")
    return ds


def num_classes(ds, label_key: str, labels_max: int) -> int:
    """The label column's class count when it declares one (ClassLabel), else the largest label + 1."""
    declared = getattr(ds.features.get(label_key), "num_classes", None)
    return int(declared or labels_max + 1)


class Piece(NamedTuple):
    """Consecutive decoded samples of a split."""

    images: np.ndarray
    """uint8 [n, C, H, W]."""
    labels: np.ndarray
    """int64 [n]."""
    layout: tuple
    """(shape of each image as decoded, before stacking; grayscale or not): what every later image
    must match, and what a resumed decode takes up (`decoded_chunks(start=..., layout=...)`)."""


def decoded_chunks(ds, split: str, image_key: str = "image", label_key: str = "label",
                   rows: Optional[int] = None, size: Optional[int] = None, workers: int = 1,
                   start: int = 0, layout: Optional[tuple] = None) -> Iterator[Piece]:
    """The split's samples from row `start` on, at most `rows` (and about CHUNK_BYTES) at a time,
    in order, decoded by `workers` threads (Pillow decodes and resizes without the GIL; 0: one per
    core, at most MAX_THREADS, for images of at least THREADS_FROM_BYTES, else 1: smaller ones
    cost more Python, which holds the GIL, than decoding). `layout`: the first piece's, when
    going on from `start` > 0.

    Grayscale images get one channel; RGBA loses its alpha channel (it carries no class). With
    `size`, every image is resized (shorter side to `size`, antialiased) and centre-cropped to
    size x size in the colour mode of the split's first image (grayscale or RGB); without, every
    image must have the first one's shape: a batch is one tensor."""
    import datasets

    rows = rows or CHUNK_ROWS
    ds = ds.select_columns([image_key, label_key])
    if isinstance(ds.features[image_key], datasets.Image):  # decoded here, one image at a time
        ds = ds.cast_column(image_key, datasets.Image(decode=False)).with_format(None)
    else:  # arrays of pixels
        ds = ds.with_format("numpy")
    if start >= len(ds):
        return
    if layout is None:  # the first piece is small: it tells the size of the rest
        first = _decode(ds, split, start, min(rows, FIRST_ROWS), image_key, label_key, size)
        yield first
        start, layout = start + len(first.labels), first.layout
    per_image = int(np.prod(layout[0])) if size is None else size * size * (1 if layout[1] else 3)
    rows = max(1, min(rows, CHUNK_BYTES // max(per_image, 1)))  # pieces of at most ~64 MiB
    workers = workers or (cores(MAX_THREADS) if per_image >= THREADS_FROM_BYTES else 1)

    def piece(at: int) -> Piece:
        return _decode(ds, split, at, rows, image_key, label_key, size, layout)

    starts = range(start, len(ds), rows)
    if workers <= 1:
        yield from map(piece, starts)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        try:
            for at in starts:
                pending.append(pool.submit(piece, at))
                if len(pending) > workers:  # a bounded read-ahead: memory holds about 2 x workers pieces
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # stopped early: do not decode what nobody will read
                future.cancel()


def _decode(ds, split: str, start: int, rows: int, image_key: str, label_key: str, size: Optional[int],
            layout: Optional[tuple] = None) -> Piece:
    """Rows [start, start + rows); `layout` comes from the first piece."""
    part = ds[start:start + rows]
    items = part[image_key]
    shape, gray = layout or (None, _first_is_gray(items[0]))
    arrays = [_pixels(item, size, gray) for item in items]
    shapes = sorted({a.shape for a in arrays} | ({tuple(shape)} if shape else set()))
    if len(shapes) > 1:
        raise ConfigError(f"config key 'data.image_key': the {split} split's images differ in shape "
                          f"({', '.join(map(str, shapes[:3]))}{', ...' if len(shapes) > 3 else ''}); "
                          "set data.image_size to resize them while decoding")
    images = np.stack(arrays)
    if images.ndim == 3:  # grayscale [n, H, W]
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4):  # channels-last
        images = images[..., :3].transpose(0, 3, 1, 2)
    return Piece(np.ascontiguousarray(images), np.ascontiguousarray(part[label_key], dtype=np.int64), (shapes[0], gray))


def cores(most: int) -> int:
    """The cores this process may use (SLURM and taskset restrict them), at most `most`."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(most, n))


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
"""Pillow modes read as one channel; every other mode (RGB, RGBA, CMYK, P, YCbCr, ...) as RGB."""


def _open(item: dict):
    import PIL.Image

    return PIL.Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])


def _first_is_gray(item) -> bool:
    if isinstance(item, dict):  # an encoded image: its header says
        return _open(item).mode in GRAY_MODES
    array = np.asarray(item)
    return array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 1)


def _pixels(item, size: Optional[int], gray: bool) -> np.ndarray:
    """One image as uint8 (H, W) or (H, W, C): an encoded image (datasets' Image feature) is
    decoded and converted to the split's colour mode (grayscale or RGB, so CMYK and palette
    images read right); with `size`, resized so its shorter side is `size` (antialiased) and
    centre-cropped to size x size, right after decoding (one full-size image in memory)."""
    import PIL.Image

    if isinstance(item, dict):
        image = _open(item).convert("L" if gray else "RGB")
    else:  # pixels already: (H, W), (H, W, 1), RGB or RGBA (alpha is dropped when stacking)
        array = np.asarray(item, dtype=np.uint8)
        if size is None:
            return array
        image = PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
        image = image.convert("L" if gray else "RGB")
    if size is not None:
        w, h = image.size
        scale = size / min(w, h)
        if (w, h) != (size, size):
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), PIL.Image.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def load_hf_split(split: str, path: Optional[str] = None, hub_name: Optional[str] = None,
                  image_key: str = "image", label_key: str = "label", size: Optional[int] = None) -> ImageArrays:
    """A split decoded into memory as ImageArrays (training runs decode once into the image cache
    instead, see image_cache.py); `size` as in decoded_chunks."""
    ds = open_hf_split(split, path, hub_name, image_key, label_key)
    chunks = list(decoded_chunks(ds, split, image_key, label_key, size=size))
    images = np.concatenate([c.images for c in chunks]) if chunks else np.zeros((0, 1, 1, 1), np.uint8)
    labels = np.concatenate([c.labels for c in chunks]) if chunks else np.zeros(0, np.int64)
    classes = num_classes(ds, label_key, int(labels.max()) if len(labels) else -1)
    return ImageArrays(torch.from_numpy(images), torch.from_numpy(labels), num_classes=classes)
