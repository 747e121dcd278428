"""A small Vision Transformer classifier (transformers' ViT, built from config sizes)."""

from __future__ import annotations

import torch
from torch import nn

from metabolic.engine.config import ConfigError


class ViTClassifier(nn.Module):
    """transformers ViTForImageClassification returning logits."""

    def __init__(self, sample_shape: tuple[int, int, int], num_classes: int, width: int, depth: int, heads: int,
                 mlp_ratio: int, patch_size: int) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        c, h, w = sample_shape
        if h != w or h % patch_size:
            raise ConfigError(f"config key 'model.patch_size': {patch_size} must divide the {h}x{w} image")
        config = ViTConfig(image_size=h, patch_size=patch_size, num_channels=c, hidden_size=width,
                           num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp_ratio * width,
                           num_labels=num_classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           attn_implementation="sdpa")
        self.hf = ViTForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits
