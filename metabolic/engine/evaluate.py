"""Evaluation on the test (or validation) split, sharded equally over ranks; BatchNorm statistics
across ranks and around screening forwards."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, world_size: int, group=None) -> Optional[list[torch.Tensor]]:
    """Average floating buffers (BatchNorm running stats) across ranks so every rank evaluates,
    and checkpoints, the same model; integer buffers (batch counters) are equal already.
    Returns this rank's values from before (float32 copies), for `restore_buffers`; None on one rank."""
    if world_size == 1:
        return None
    before = []
    for buf in module.buffers():
        if buf.is_floating_point():
            tmp = buf.detach().float().cpu()
            before.append(tmp.clone())
            dist.all_reduce(tmp, group=group)
            buf.copy_(tmp.div_(world_size).to(buf.device, buf.dtype))
    return before


@torch.no_grad()
def restore_buffers(module: torch.nn.Module, before: Optional[list[torch.Tensor]]) -> None:
    """Put back the floating buffers `sync_buffers` returned (a no-op for None)."""
    if before is None:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    for buf, old in zip(bufs, before, strict=True):
        buf.copy_(old.to(buf.device, buf.dtype))


@torch.no_grad()
def evaluate(engine, task, batch_size: int, rank: int, world_size: int, group=None) -> dict:
    """Global eval figures from the task. Every rank runs the same number of forwards (ZeRO-3
    needs all ranks in each forward); padding samples are masked out of the sums."""
    n = task.num_test
    per_rank = -(-n // world_size)
    lo = rank * per_rank
    module = engine.module
    was_training = module.training
    module.eval()
    sums = torch.zeros(len(task.eval_fields), dtype=torch.float64)
    for start in range(0, per_rank, batch_size):
        idx = torch.arange(lo + start, lo + min(start + batch_size, per_rank))
        valid = idx < n
        inputs, targets = task.test_batch(idx.clamp(max=n - 1))
        sums += torch.tensor(task.eval_sums(engine(inputs), targets, valid), dtype=torch.float64)
    if was_training:
        module.train()
    if world_size > 1:
        dist.all_reduce(sums, group=group)
    return task.eval_metrics(sums.tolist())


@contextlib.contextmanager
def frozen_running_stats(module: torch.nn.Module):
    """Train-mode forwards inside leave BatchNorm running statistics as they were (a screening
    forward must not count a batch twice)."""
    saved = []
    for mod in module.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
            saved.append((mod, mod.momentum, mod.num_batches_tracked.clone()))
            mod.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for mod, momentum, tracked in saved:
            mod.momentum = momentum
            mod.num_batches_tracked.copy_(tracked)
