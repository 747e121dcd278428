"""IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from metabolic.data.arrays import ImageArrays
from metabolic.engine.config import ConfigError

# IDX type codes -> numpy dtypes (big-endian on disk).
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MISSING_HELP = (
    "Fashion-MNIST is installed by the Debian package dataset-fashion-mnist "
    "(`sudo apt-get install dataset-fashion-mnist`, which `make setup` runs when it can), "
    "or set data.path to a folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
)


class DatasetMissingError(FileNotFoundError):
    """A dataset file is not where the config says; the message says how to get it."""


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file: magic (2 zero bytes, type code, ndim), big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ConfigError(f"config key 'data.path': {path} is not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ConfigError(f"config key 'data.path': {path} is truncated: its header needs {4 + 4 * ndim} bytes, "
                          f"the file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - offset < count * dtype.itemsize:
        raise ConfigError(f"config key 'data.path': {path} is truncated: expected {count} values of shape {dims}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DatasetMissingError(f"dataset file {folder / stem}[.gz] not found. {MISSING_HELP}")


def load_idx_split(folder: str | Path, split: str) -> ImageArrays:
    """Load the 'train' or 't10k'/'test' split from an IDX folder (classes: the largest label + 1;
    load_image_splits reconciles them across splits and sets the normalisation)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetMissingError(f"data.path '{folder}' is not a folder. {MISSING_HELP}")
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}[split]
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"config key 'data.path': {folder}: {images.shape[0]} images but {labels.shape[0]} labels "
                          f"in split {split}")
    x = torch.from_numpy(images.astype(np.uint8, copy=True)).unsqueeze(1)  # [N, 1, H, W]
    y = torch.from_numpy(labels.astype(np.int64, copy=True))
    return ImageArrays(x, y, num_classes=int(y.max()) + 1 if len(y) else 0)
