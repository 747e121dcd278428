"""Dataset sources. Every sample has a stable global index: its row in the training arrays."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from metabolic.data.arrays import ImageArrays, pixel_stats
from metabolic.data.hf import load_hf_split
from metabolic.data.idx import DatasetMissingError, load_idx_split, read_idx
from metabolic.engine.config import ConfigError


def load_image_splits(cfg, run_dir: Optional[Path] = None,
                      keys: Optional[dict[str, str]] = None) -> tuple[ImageArrays, ImageArrays]:
    """Train and test ImageArrays for a DataConfig, with data.limit / data.eval_limit applied.

    source=hf: with `keys` (image_cache.prepare_splits), the splits rank 0 decoded into the image
    cache, memory-mapped; without, both splits decoded into memory here."""
    stats = None
    if cfg.source == "idx":
        train, test = load_idx_split(cfg.path, "train"), load_idx_split(cfg.path, "test")
    elif cfg.source == "hf" and keys is not None:
        from metabolic.data import image_cache

        train, test, stats = image_cache.load_splits(cfg, run_dir, keys)
    elif cfg.source == "hf":
        kw = dict(path=cfg.path, hub_name=cfg.hf_name, image_key=cfg.image_key, label_key=cfg.label_key,
                  size=cfg.image_size)
        train, test = load_hf_split("train", **kw), load_hf_split("test", **kw)
    else:
        raise ConfigError(f"config key 'data.source': unknown source {cfg.source!r}")
    key = "data.label_key" if cfg.source == "hf" else "data.path"
    where = "data.path" if cfg.path else "data.hf_name"  # the key that names the dataset
    for name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise DatasetMissingError(f"config key '{where}': the {name} split of '{cfg.path or cfg.hf_name}' is empty")
        if int(split.labels.min()) < 0:
            raise ConfigError(f"config key '{key}': the {name} split has negative labels (unlabelled?); "
                              "every sample needs a class index >= 0")
    if test.sample_shape != train.sample_shape:  # the model is built for the training images
        raise ConfigError(f"config key '{where}': test images are "
                          f"{test.sample_shape} (channels, height, width), "
                          f"training images {train.sample_shape}; both splits need one shape")
    # One class count for both splits: a class that only the test split holds must still fit the head.
    # Both splits are normalised with the whole training split's pixel statistics, whatever data.limit.
    classes = max(train.num_classes, test.num_classes)
    mean, std = stats or pixel_stats(train.images)
    train, test = (replace(s, num_classes=classes, mean=mean, std=std) for s in (train, test))
    return train.head(cfg.limit), test.head(cfg.eval_limit)


__all__ = ["ImageArrays", "DatasetMissingError", "load_idx_split", "load_hf_split", "load_image_splits", "read_idx"]
