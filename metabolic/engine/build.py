"""From one config to the parts of a run: task, model, optimizer, DeepSpeed config."""

from __future__ import annotations

import math

import torch
from torch import nn

from metabolic.engine.config import ExperimentConfig


def build_task(cfg: ExperimentConfig, device: torch.device):
    """The training task and its data (raises DatasetMissingError with instructions)."""
    from metabolic.data import load_image_splits
    from metabolic.engine.task import ImageClassification

    train, test = load_image_splits(cfg.data)
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    return ImageClassification(train, test, augment=cfg.data.augment, device=device, dtype=dtype)


def build_model(cfg: ExperimentConfig, task) -> nn.Module:
    from metabolic.models import build_classifier

    return build_classifier(cfg.model, task.train.sample_shape, task.train.num_classes)


def build_optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed wraps; masked optimizers select which weights change."""
    o = cfg.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    from metabolic.kernels import MaskedAdamW, MaskedSGD

    select = dict(select=o.select, fraction=o.fraction, price=o.price, alpha=cfg.energy.alpha,
                  residual=o.residual, block_size=o.block_size, seed=cfg.seed)
    if o.name == "masked_adamw":
        return MaskedAdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, **select)
    if o.name == "masked_sgd":
        return MaskedSGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **select)
    raise ValueError(f"config key 'optimizer.name': unknown optimizer {o.name!r}")


def deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict:
    """The DeepSpeed config dict for this experiment."""
    t, z = cfg.train, cfg.deepspeed
    zero: dict = {"stage": z.zero_stage}
    if z.offload_optimizer and z.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bool(t.bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.bf16:
        # BatchNorm needs its running stats in the same dtype as its bf16 weights.
        ds["data_types"] = {"buffer_dtype": "bf16"}
    if t.grad_clip > 0:
        ds["gradient_clipping"] = t.grad_clip
    return ds


def forward_flops_per_sample(model: nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one sample's forward pass, counted once by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    model.train(was_training)
    return float(counter.get_total_flops())


def learning_rate(cfg: ExperimentConfig, step: int, progress: float) -> float:
    """Linear warmup over optimizer steps, then constant or cosine over training progress in [0, 1].

    Progress is measured in epochs (or steps against max_steps), not optimizer steps, so a policy
    that drops samples keeps the same schedule over the same nominal epochs as dense training.
    """
    lr = cfg.optimizer.lr
    warm = cfg.train.warmup_steps
    if warm and step < warm:
        return lr * (step + 1) / warm
    if cfg.train.lr_schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return lr
