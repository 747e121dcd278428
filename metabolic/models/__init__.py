"""Models built from config by name (causal LMs: metabolic.models.lm)."""

from __future__ import annotations

from torch import nn

from metabolic.engine.config import ConfigError
from metabolic.models.mlp import MLP
from metabolic.models.resnet import ResNet, resnet18, resnet_small


def build_classifier(cfg, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier for ModelConfig `cfg` taking inputs of `sample_shape` (C, H, W)."""
    if cfg.name == "resnet_small":
        return resnet_small(sample_shape[0], num_classes, width=cfg.width, depth=cfg.depth)
    if cfg.name == "resnet18":
        return resnet18(sample_shape[0], num_classes, width=cfg.width)
    if cfg.name == "mlp":
        return MLP(sample_shape, num_classes, width=cfg.width, depth=cfg.depth)
    if cfg.name == "vit":
        from metabolic.models.vit import ViTClassifier

        return ViTClassifier(sample_shape, num_classes, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.patch_size)
    raise ConfigError(f"config key 'model.name': unknown model {cfg.name!r}")


__all__ = ["build_classifier", "MLP", "ResNet", "resnet_small", "resnet18"]
