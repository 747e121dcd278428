"""Dataset sources. Every sample has a stable global index: its row in the training arrays."""

from __future__ import annotations

from metabolic.data.arrays import ImageArrays
from metabolic.data.hf import load_hf_split
from metabolic.data.idx import DatasetMissingError, load_idx_split, read_idx


def load_image_splits(cfg) -> tuple[ImageArrays, ImageArrays]:
    """Train and test ImageArrays for a DataConfig, with data.limit / data.eval_limit applied."""
    if cfg.source == "idx":
        train, test = load_idx_split(cfg.path, "train"), load_idx_split(cfg.path, "test")
    elif cfg.source == "hf":
        kw = dict(path=cfg.path, hub_name=cfg.hf_name, image_key=cfg.image_key, label_key=cfg.label_key)
        train, test = load_hf_split("train", **kw), load_hf_split("test", **kw)
    else:
        raise ValueError(f"config key 'data.source': unknown source {cfg.source!r}")
    return train.head(cfg.limit), test.head(cfg.eval_limit)


__all__ = ["ImageArrays", "DatasetMissingError", "load_idx_split", "load_hf_split", "load_image_splits", "read_idx"]
