"""The energy ledger: the single source of every energy and data figure a run reports.

Each rank keeps partial sums for the weights it updates, measured from the applied change of
the fp32 master weights, and the ledger reduces them with one all_reduce per logging interval.

Which tensors are "this rank's master weights" depends on the ZeRO stage (PLATFORM.md): under
ZeRO 1-3 and bf16 the client optimizer steps flat fp32 partitions, one disjoint slice per rank;
under stage 0 in fp32 it steps the model's own parameters, a full replica on every rank. The
ledger hooks the client optimizer's step() so it sees exactly what the optimizer changes, and
for replicas it counts only this rank's contiguous chunk of each tensor so the global sum counts
every weight once.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from metabolic.engine.config import ConfigError
from metabolic.engine.joules import JouleMeter
from metabolic.kernels import native

# Order of the reduced vector; everything in it is a global sum.
_FIELDS = ("metabolic", "changed", "metabolic_min", "samples_forward", "samples_backward", "tokens",
           "flops", "joules", "has_joules", "loss_sum", "loss_count", "numel")


def energy_of(dw: torch.Tensor, alpha: float, inplace: bool = False) -> torch.Tensor:
    """sum |dw|^alpha as a float64 0-d tensor, with 0^alpha = 0 (unchanged weights cost nothing,
    also at alpha=0). inplace=True overwrites dw with |dw|^alpha instead of allocating a copy.

    On GPUs one float64 vector_norm pass (reads dw once). On CPUs torch's float32 cascade sum
    (relative error ~1e-7 on 25M elements): a float64 reduction converts element by element
    there (~10x slower), and vector_norm(ord=1) in float32 does not cascade (5% off at 25M)."""
    if alpha == 0.0:
        return torch.count_nonzero(dw).to(torch.float64)
    if alpha == 1.0 and dw.is_cuda:
        return torch.linalg.vector_norm(dw, ord=1, dtype=torch.float64)
    a = dw.abs_() if inplace else dw.abs()
    if alpha != 1.0:
        a = a.pow_(alpha)
    return (a.sum() if a.dtype == torch.float64 else a.float().sum()).to(torch.float64)


class EnergyLedger:
    """Per-rank partial sums of energy, samples and FLOPs, reduced globally on demand."""

    def __init__(self, alpha: float, model_numel: int, rank: int, world_size: int, group=None,
                 joules: Optional[JouleMeter] = None, use_optimizer_energy: bool = True) -> None:
        self.alpha = alpha
        self.model_numel = model_numel
        self.replicated: Optional[bool] = None  # decided at the first step from what the optimizer holds
        self.rank, self.world_size, self.group = rank, world_size, group
        self.joules = joules
        self.use_optimizer_energy = use_optimizer_energy
        self.local = {k: 0.0 for k in _FIELDS}
        self.local["metabolic"] = torch.zeros((), dtype=torch.float64)
        self.local["changed"] = torch.zeros((), dtype=torch.float64)
        self._tracked: list[torch.Tensor] = []  # master tensors in the order first seen
        self._initial: list[torch.Tensor] = []  # their values before the first step (this rank's chunk)
        self._ids: dict[int, int] = {}
        self._restored_initial: Optional[list[torch.Tensor]] = None
        self._snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
        # One snapshot buffer per tensor, reused every step: a fresh weight-sized buffer per
        # step costs page faults on CPU (~70 ms per 100 MB) and allocator churn on GPU.
        self._snapshot_buffers: dict[int, torch.Tensor] = {}
        self._last_min_local = 0.0  # M_min share at the last reduce (used until a step re-tracks weights)
        self._wall_offset = 0.0
        self._joules_offset = 0.0  # joules measured before the last resume
        self._t0 = time.perf_counter()

    # -- weights -----------------------------------------------------------------------------
    def _chunk(self, p: torch.Tensor) -> torch.Tensor:
        flat = p.detach().reshape(-1)
        if not self.replicated or self.world_size == 1:
            return flat
        n = flat.numel()
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return flat[lo:hi]

    def _track(self, p: torch.Tensor) -> None:
        if id(p) in self._ids:
            return
        self._ids[id(p)] = len(self._tracked)
        self._tracked.append(p)
        if self._restored_initial is not None:
            init = self._restored_initial[len(self._initial)]
            if init.numel() != self._chunk(p).numel():
                raise RuntimeError("checkpoint's initial weights do not match this run's partitioning "
                                   "(resume with the same world size and ZeRO stage)")
            self._initial.append(init)
        else:
            self._initial.append(self._chunk(p).detach().clone().float())

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook the client optimizer: snapshot before step(), account the applied change after."""
        optimizer.register_step_pre_hook(self._pre_step)
        optimizer.register_step_post_hook(self._post_step)

    def _params(self, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                yield p

    def _measure_from_optimizer(self, optimizer) -> bool:
        return self.use_optimizer_energy and hasattr(optimizer, "last_energy_tensors") and not self.replicated

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self.replicated is None:
            # A partition (ZeRO 1-3, DeepSpeed's bf16 optimizer with partitioning) holds about
            # 1/world of the weights; a replica holds all of them on every rank.
            local = sum(p.numel() for p in self._params(optimizer))
            self.replicated = self.world_size > 1 and local >= self.model_numel
        for p in self._params(optimizer):
            self._track(p)
        if self._measure_from_optimizer(optimizer):
            return
        self._snapshots = [(p, self._snapshot(p)) for p in self._params(optimizer)]

    def _snapshot(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of p before the step, copied into p's reused buffer."""
        chunk = self._chunk(p)
        buf = self._snapshot_buffers.get(id(p))
        if buf is None or buf.shape != chunk.shape or buf.dtype != chunk.dtype or buf.device != chunk.device:
            buf = self._snapshot_buffers[id(p)] = torch.empty_like(chunk, memory_format=torch.contiguous_format)
        return buf.copy_(chunk)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._measure_from_optimizer(optimizer):
            metabolic, changed = optimizer.last_energy_tensors  # device tensors: no host sync
            self._accumulate("metabolic", metabolic)
            self._accumulate("changed", changed.to(torch.float64))
            return
        for p, before in self._snapshots:
            after = self._chunk(p)
            measured = native.diff_energy(after, before, self.alpha)  # CPU: one pass, no writes
            if measured is not None:
                metabolic, changed = measured
            else:
                if before.dtype == torch.float32 and after.dtype == torch.float32:
                    dw = torch.sub(after, before, out=before)  # the snapshot is spent: reuse its memory
                else:
                    dw = after.float() - before.float()
                changed = torch.count_nonzero(dw)
                metabolic = energy_of(dw, self.alpha, inplace=True)
            self._accumulate("metabolic", metabolic)
            self._accumulate("changed", changed.to(torch.float64))
        self._snapshots = []

    def _accumulate(self, key: str, value: torch.Tensor) -> None:
        # Accumulate on the weights' device: no host sync per step (the sum is read once per interval).
        acc = self.local[key]
        if acc.device != value.device:
            acc = acc.to(value.device)
        self.local[key] = acc + value

    def metabolic_min_local(self) -> float:
        """This rank's share of M_min = sum |w_T - w_0|^alpha."""
        if not self._tracked:  # resumed, no step taken yet: the checkpoint's figure still holds
            return self._last_min_local
        total = 0.0
        for p, init in zip(self._tracked, self._initial):
            total += float(energy_of(self._chunk(p).float() - init, self.alpha))
        self._last_min_local = total
        return total

    # -- samples and compute -----------------------------------------------------------------
    def add_samples(self, forward: int = 0, backward: int = 0, tokens: int = 0, flops: float = 0.0) -> None:
        """Count sample passes of this rank (a training micro-batch is forward and backward)."""
        self.local["samples_forward"] += forward
        self.local["samples_backward"] += backward
        self.local["tokens"] += tokens
        self.local["flops"] += flops

    def add_loss(self, loss_sum: torch.Tensor, count: int) -> None:
        """Accumulate training loss for the interval mean (reset by `reduce`); stays on device."""
        self.local["loss_sum"] = self.local["loss_sum"] + loss_sum.double()
        self.local["loss_count"] += count

    def start_clock(self) -> None:
        """Wall time counts from the start of training (setup and compilation excluded)."""
        self._t0 = time.perf_counter()

    def wall_s(self) -> float:
        return self._wall_offset + time.perf_counter() - self._t0

    # -- reduction -----------------------------------------------------------------------------
    def reduce(self) -> dict:
        """One all_reduce of every partial sum; returns global figures under DESIGN.md's metric names."""
        vals = dict(self.local)
        vals["metabolic"] = float(self.local["metabolic"])
        vals["changed"] = float(self.local["changed"])
        vals["metabolic_min"] = self.metabolic_min_local()
        vals["numel"] = float(sum(init.numel() for init in self._initial))
        j = self._joules_total()
        vals["joules"], vals["has_joules"] = (j, 1.0) if j is not None else (0.0, 0.0)
        vec = torch.tensor([float(vals[k]) for k in _FIELDS], dtype=torch.float64)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(vec, group=self.group)
        g = dict(zip(_FIELDS, vec.tolist()))
        self.local["loss_sum"], self.local["loss_count"] = 0.0, 0.0
        return {
            "train/loss": g["loss_sum"] / g["loss_count"] if g["loss_count"] else None,
            "energy/metabolic": g["metabolic"],
            "energy/metabolic_min": g["metabolic_min"],
            "energy/changed_weights": int(round(g["changed"])),
            "energy/joules": g["joules"] if g["has_joules"] > 0 else None,
            "energy/num_weights": int(round(g["numel"])),
            "data/samples_forward": int(round(g["samples_forward"])),
            "data/samples_backward": int(round(g["samples_backward"])),
            "data/tokens": int(round(g["tokens"])),
            "compute/flops": g["flops"],
            "time/wall_s": self.wall_s(),
        }

    def _joules_total(self) -> Optional[float]:
        """Joules since the run began (the meter counts from its own start), None without a meter."""
        j = self.joules.read() if self.joules is not None else None
        return None if j is None else self._joules_offset + j

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Scalars only; this rank's initial weights go in `initial_weights()` (saved per rank)."""
        local = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in self.local.items()}
        return {"local": local, "wall_s": self.wall_s(), "alpha": self.alpha, "replicated": self.replicated,
                "min_local": self.metabolic_min_local(), "joules": self._joules_total() or 0.0}

    def load_state_dict(self, state: dict) -> None:
        if state["alpha"] != self.alpha:
            raise ConfigError(f"config key 'energy.alpha': checkpoint used {state['alpha']}, run asks {self.alpha}")
        for k, v in state["local"].items():
            self.local[k] = torch.tensor(v, dtype=torch.float64) if k in ("metabolic", "changed") else v
        self.replicated = state["replicated"]
        self._wall_offset = state["wall_s"]
        self._joules_offset = state.get("joules", 0.0)
        self._last_min_local = state["min_local"]
        self._t0 = time.perf_counter()

    def initial_weights(self) -> list[torch.Tensor]:
        return list(self._initial)

    def load_initial_weights(self, tensors: list[torch.Tensor]) -> None:
        """Use a checkpoint's w_0 for the tensors tracked from the next step on."""
        self._restored_initial = tensors
        self._tracked, self._initial, self._ids = [], [], {}
