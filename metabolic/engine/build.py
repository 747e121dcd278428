"""From one config to the parts of a run: task, model, optimizer, DeepSpeed config."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from metabolic.data.idx import DatasetMissingError
from metabolic.engine.config import LM_MODELS, ConfigError, ExperimentConfig
from metabolic.engine.rank_setup import RankSetup

T = TypeVar("T")


def build_task(cfg: ExperimentConfig, device: torch.device, run_dir: Path, setup: RankSetup = RankSetup()):
    """The training task and its data (raises DatasetMissingError with instructions)."""
    if cfg.model.name in LM_MODELS:
        return build_lm_task(cfg, device, run_dir, setup)
    from metabolic.data import load_image_splits
    from metabolic.engine.task import ImageClassification

    keys = None
    if cfg.data.source == "hf":  # decoded once, by rank 0, into the image cache
        from metabolic.data import image_cache

        keys = setup.on_rank0(lambda: image_cache.prepare_splits(cfg.data, run_dir, setup.should_stop))
    train, test = _on_every_rank(setup, lambda: load_image_splits(cfg.data, run_dir, keys))
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    return ImageClassification(train, test, augment=cfg.data.augment, device=device, dtype=dtype)


def build_lm_task(cfg: ExperimentConfig, device: torch.device, run_dir: Path, setup: RankSetup = RankSetup()):
    """Corpus -> tokenizer and token file (prepared once, by rank 0) -> packed train/validation rows."""
    from metabolic.data import lm_corpus
    from metabolic.engine.task import LanguageModeling

    key = setup.on_rank0(lambda: lm_corpus.prepare(cfg, run_dir, setup.should_stop))
    tokenizer, train, val = _on_every_rank(setup, lambda: lm_corpus.load(cfg, run_dir, key))
    task = LanguageModeling(train, val, vocab_size=len(tokenizer), device=device)
    task.tokenizer = tokenizer
    return task


def _on_every_rank(setup: RankSetup, load: Callable[[], T]) -> T:
    """`load()` on every rank; a rank's failure is raised there as it is, and on every other rank
    as a DatasetMissingError naming it (else they would go on into the next collective and wait
    there for the rank that left)."""
    try:
        loaded = load()
    except Exception as err:
        with contextlib.suppress(DatasetMissingError):
            setup.agree(str(err) if isinstance(err, (ConfigError, DatasetMissingError))
                        else f"{type(err).__name__}: {err}")
        raise
    setup.agree(None)
    return loaded


def build_model(cfg: ExperimentConfig, task, ds_config: dict) -> tuple[nn.Module, object]:
    """The model, and for LMs under ZeRO-3 the HfDeepSpeedConfig that must stay alive with it."""
    if cfg.model.name in LM_MODELS:
        from metabolic.models.lm import build_causal_lm

        keep_alive = None
        if cfg.deepspeed.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_config build inside zero.Init
        vocab = max(task.vocab_size, cfg.model.vocab_size or 0)
        model = build_causal_lm(cfg.model, vocab, task.seq_len, task.tokenizer.eos_token_id)
        return model, keep_alive
    from metabolic.models import build_classifier

    return build_classifier(cfg.model, task.train.sample_shape, task.train.num_classes), None


def count_params(model: nn.Module) -> int:
    """Trainable weights, also when ZeRO-3 has already partitioned them (ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def forward_flops_per_sample(cfg: ExperimentConfig, model: nn.Module, task) -> float:
    """Forward FLOPs of one sample: counted by torch's FLOP counter, analytic for LMs."""
    if cfg.model.name in LM_MODELS:
        from metabolic.models.lm import lm_forward_flops_per_token

        return lm_forward_flops_per_token(cfg.model, count_params(model), task.seq_len) * task.seq_len
    return counted_forward_flops(model, task.example())


# What the dense tail sets; with a residual, the first dense step pays out what it held.
DENSE_SELECTION = dict(select="dense", count_price=0.0)
# What a dense group (dense_1d) overrides in the masked optimizer's defaults.
DENSE_GROUP = dict(DENSE_SELECTION, residual=False, residual_decay=1.0)


def selection_of(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Per param group, the configured selection (empty for plain torch optimizers)."""
    return [{k: g[k] for k in DENSE_SELECTION} if "select" in g else {} for g in optimizer.param_groups]


def masked_param_groups(params, dense_1d: bool) -> list[dict]:
    """One group for the masked rule; with dense_1d a second, dense group for 1-D tensors.

    Biases and norm scales are a small share of the weights (and of M) but steer every
    activation; under ZeRO-3 a parameter's own shape is in ds_shape (its data is a shard)."""
    params = list(params)
    if not dense_1d:
        return [{"params": params}]
    matrices, vectors = [], []
    for p in params:
        (vectors if len(getattr(p, "ds_shape", p.shape)) <= 1 else matrices).append(p)
    groups = [{"params": matrices}] if matrices else []
    return groups + ([{"params": vectors, **DENSE_GROUP}] if vectors else [])


def build_optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed wraps; masked optimizers select which weights change."""
    o = cfg.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    from metabolic.kernels import MaskedAdamW, MaskedSGD

    select = dict(select=o.select, fraction=o.fraction, price=o.price, alpha=cfg.energy.alpha,
                  residual=o.residual, residual_decay=o.residual_decay, count_price=o.count_price,
                  block_size=o.block_size, seed=cfg.seed)
    params = masked_param_groups(params, o.dense_1d)
    if o.name == "masked_adamw":
        return MaskedAdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, **select)
    if o.name == "masked_sgd":
        return MaskedSGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **select)
    raise ConfigError(f"config key 'optimizer.name': unknown optimizer {o.name!r}")


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
    # Always explicit: without the key DeepSpeed was seen clipping a client optimizer's gradients at 1.0.
    ds["gradient_clipping"] = float(t.grad_clip)
    return ds


def counted_forward_flops(model: nn.Module, example: torch.Tensor) -> float:
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
