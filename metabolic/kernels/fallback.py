"""Torch implementation of the masked step, for devices without Triton and CPUs without a C compiler
(on CPU the native step in `cpu_step.c` is faster: it reduces inside its update loop).

Same math and the same selection decisions as `reference.py`, organised for speed:

- Thresholds come first (`threshold.py`): top-k from the candidate update recomputed on a
  ~16K gathered sample (moments updated on the gathered copies only); block from a first pass
  that computes per-block squared norms of u_total without writing anything. Then ONE pass
  updates moments, forms u_total, selects, applies, writes the residual and the optional bf16
  copy, and reduces energy and changed count.
- That pass is `torch.compile`d (one fused C++ loop, no temporaries) for large buffers.
  Inductor's CPU code puts a reduction in a loop of its own that recomputes its inputs, so
  reducing the energy inside the step would compute the whole AdamW update twice; the compiled
  step stores the applied change in a reused scratch buffer and a second, cheap pass reduces it.
  On 25M fp32 params with 1 thread that costs ~1.7x of fused AdamW for dense (2.2x with both
  reductions in the step); the update alone is ~1.0x (benchmarks/optimizer_step.py). Compilation
  is lazy (first large step), optional (METABOLIC_COMPILE=0 or compile=False), and any compile
  error falls back to eager for the rest of the process.
- Eager mode runs the same code over chunks of CHUNK elements, so every temporary is
  cache-sized and recycled by the allocator instead of a fresh param-sized buffer per op
  (a fresh 100 MB temporary costs ~70 ms of page faults on 25M params).

Scalars travel as tensors (hp: float32, hi: int64) so a changing lr, step or random seed does
not trigger recompilation; only the rule, alpha and layout flags are static.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from .spec import StepSpec, element_hash, hash_base, RANDOM_BITS
from .threshold import block_threshold, num_blocks, sample_indices, topk_threshold

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # eager chunk: ~256 KB per fp32 operand, stays in L2
COMPILE_MIN_NUMEL = 1 << 20  # below this, compile time is never paid back in a test or small model

_compile_broken = False
_compiled: dict[str, object] = {}


def _hp(spec: StepSpec, device: torch.device) -> torch.Tensor:
    """Float scalars of the step, as one tensor (index layout used by _candidate)."""
    if spec.kind == "adamw":
        vals = [spec.lr, spec.weight_decay, 1.0 - spec.beta1, spec.beta2, 1.0 - spec.beta2,
                spec.eps, spec.lr / spec.bias_correction1, 1.0 / spec.bias_correction2_sqrt,
                spec.price, spec.beta1, spec.residual_decay, spec.count_price]
    else:
        a = 0.0 if spec.first else spec.momentum
        b = 1.0 if spec.first else 1.0 - spec.dampening
        vals = [spec.lr, spec.weight_decay, a, b, spec.momentum, 0.0, 0.0, 0.0, spec.price, 0.0,
                spec.residual_decay, spec.count_price]
    return torch.tensor(vals, dtype=torch.float32, device=device)


def _candidate(p, g, m, v, r, hp, kind: str, has_momentum: bool, nesterov: bool, residual: bool):
    """(u_total, eta, new first moment / momentum buffer, new second moment); writes nothing."""
    lr, wd = hp[0], hp[1]
    if kind == "adamw":
        # one division per element: at 1 CPU thread the step is compute-bound, and dividing
        # by a reciprocal instead of by sqrt(bias_correction2) changes results by ~1 ulp
        m_new = m * hp[9] + hp[2] * g
        v_new = v * hp[3] + hp[4] * (g * g)
        inv = 1.0 / (v_new.sqrt() * hp[7] + hp[5])  # 1 / (sqrt(v_hat) + eps)
        u = -hp[6] * m_new * inv - lr * wd * p
        eta = lr * inv
    else:
        v_new = None
        d = g + wd * p
        if has_momentum:
            m_new = hp[2] * m + hp[3] * d
            d = d + hp[4] * m_new if nesterov else m_new
        else:
            m_new = None
        u = -lr * d
        eta = lr
    if residual:
        u = u + r
    return u, eta, m_new, v_new


def _fused(p, g, m, v, r, pbf, dw_out, hp, hi, aux, offset: int, kind: str, has_momentum: bool,
           nesterov: bool, residual: bool, rule: str, block_size: int, alpha: float):
    """Moments, candidate, selection, apply, residual, bf16 copy, energy: one pass, in place.

    With `dw_out` the applied change is stored there instead of reduced: inductor's CPU code
    computes a reduction in its own loop, which would recompute the whole step a second time."""
    u, eta, m_new, v_new = _candidate(p, g, m, v, r, hp, kind, has_momentum, nesterov, residual)
    if rule == "dense":
        dw = u
    elif rule == "soft":
        t = torch.clamp(u.abs() - hp[8] * eta, min=0.0)
        dw = torch.where(t * t >= 2.0 * hp[11] * eta, torch.sign(u) * t, torch.zeros_like(u))
    else:
        if rule == "hard":
            keep = u * u > 2.0 * hp[8] * eta
        elif rule == "topk":
            keep = u.abs() > aux
        else:
            idx = torch.arange(p.numel(), device=p.device, dtype=torch.int64) + offset
            if rule == "random":
                keep = (element_hash(idx, hi[0]) >> (32 - RANDOM_BITS)) < hi[1]
            else:  # block: aux holds the keep flag of every block
                keep = aux[idx // block_size]
        dw = torch.where(keep, u, torch.zeros_like(u))
    p_new = p + dw
    d = p_new - p
    if dw_out is not None:
        dw_out.copy_(d)
        energy = changed = None
    else:
        energy, changed = _energy(d, alpha)
    if m_new is not None:
        m.copy_(m_new)
    if v_new is not None:
        v.copy_(v_new)
    if residual:
        r.copy_(hp[10] * (u - dw))
    p.copy_(p_new)
    if pbf is not None:
        pbf.copy_(p_new.to(torch.bfloat16))
    return energy, changed


def _energy(d, alpha: float):
    """(sum |d|^alpha, count of d != 0) of the applied change, 0^alpha = 0."""
    nz = d != 0
    if alpha == 0.0:
        energy = nz.sum(dtype=torch.float32)
    elif alpha == 1.0:
        energy = d.abs().sum()
    else:
        energy = torch.where(nz, d.abs() ** alpha, torch.zeros_like(d)).sum()
    return energy, nz.sum()


def _block_sq_norms(p, g, m, v, r, hp, kind: str, has_momentum: bool, nesterov: bool,
                    residual: bool, block_size: int):
    """Pass 1 of the block rule: squared L2 norm of u_total per block; writes nothing."""
    u, _, _, _ = _candidate(p, g, m, v, r, hp, kind, has_momentum, nesterov, residual)
    n = u.numel()
    nb = (n + block_size - 1) // block_size
    u = F.pad(u, (0, nb * block_size - n))
    return (u * u).view(nb, block_size).sum(dim=1)


_FUNCTIONS = {"fused": _fused, "block": _block_sq_norms, "energy": _energy}


def _scratch(n: int, device: torch.device) -> torch.Tensor:
    """A reused fp32 buffer of at least n elements (the applied change of the compiled step)."""
    buf = _scratch_buffers.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32, device=device)
        _scratch_buffers[device] = buf
    return buf[:n]


_scratch_buffers: dict[torch.device, torch.Tensor] = {}


def compile_enabled() -> bool:
    return not _compile_broken and os.environ.get("METABOLIC_COMPILE", "1") != "0"


def _get_compiled(name: str):
    """torch.compile lazily, once per function; dynamic shapes so any numel reuses it."""
    fn = _compiled.get(name)
    if fn is None:
        import torch._dynamo as dynamo
        # one compiled variant per (rule, alpha, flags) combination: allow more than the default 8
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, key):
                setattr(dynamo.config, key, max(getattr(dynamo.config, key), 64))
        # without the realize_* options inductor materialises p_new (read by the energy
        # reduction next to old p) into a fresh param-sized buffer and copies it back: 5x slower
        fn = torch.compile(_FUNCTIONS[name], dynamic=True,
                           options={"realize_reads_threshold": 1000,
                                    "realize_opcount_threshold": 1000,
                                    "realize_acc_reads_threshold": 1000})
        _compiled[name] = fn
    return fn


def _call(name: str, compiled: bool, *args, **kwargs):
    fn = _get_compiled(name) if compiled else _FUNCTIONS[name]
    return fn(*args, **kwargs)


def _views(tensors, start: int, stop: int):
    return [None if t is None else t[start:stop] for t in tensors]


def fallback_step(p: torch.Tensor, g: torch.Tensor, state: dict, spec: StepSpec,
                  out_bf16: torch.Tensor | None = None, compile: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked step on flat fp32 `p` in place; returns 0-d (energy float64, changed int64).

    compile: None = compile when p has >= COMPILE_MIN_NUMEL elements and compiling is enabled.
    """
    global _compile_broken
    compiled = (p.numel() >= COMPILE_MIN_NUMEL) if compile is None else compile
    if compiled and compile_enabled():
        try:
            return _step(p, g, state, spec, out_bf16, compiled=True)
        except Exception as exc:  # compile errors surface before any write; a broken
            _compile_broken = True  # toolchain must not stop training
            log.warning("torch.compile of the masked step failed, using eager: %s", exc)
    return _step(p, g, state, spec, out_bf16, compiled=False)


def _stored_energy(dw: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy of the change the compiled step stored. p is already written here, so a compile
    failure must not send the whole step round again (eager): it would be applied twice."""
    global _compile_broken
    try:
        return _call("energy", True, dw, alpha=alpha)
    except Exception as exc:
        _compile_broken = True
        log.warning("torch.compile of the energy pass failed, using eager: %s", exc)
        return _energy(dw, alpha=alpha)


def _step(p, g, state, spec, out_bf16, compiled: bool):
    n = p.numel()
    dev = p.device
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=dev), torch.zeros((), dtype=torch.int64, device=dev)
    g = g.float()
    has_momentum = spec.kind == "adamw" or spec.momentum != 0.0
    m = state.get("exp_avg", state.get("momentum_buffer")) if has_momentum else None
    v = state.get("exp_avg_sq")
    r = state.get("residual") if spec.residual else None
    hp = _hp(spec, dev)
    hi = torch.tensor([hash_base(spec.seed, spec.step, spec.salt), spec.random_threshold],
                      dtype=torch.int64, device=dev)
    flags = dict(kind=spec.kind, has_momentum=has_momentum, nesterov=spec.nesterov,
                 residual=spec.residual)
    chunk = n if compiled else CHUNK
    aux = None
    if spec.select == "topk":
        idx = sample_indices(n, spec.seed, spec.step, spec.salt, dev)
        sample = _views([p, g, m, v, r], 0, n)
        u_s, _, _, _ = _candidate(*[None if t is None else t[idx] for t in sample], hp, **flags)
        aux = topk_threshold(u_s.abs(), spec.fraction)
    elif spec.select == "block":
        bs = spec.block_size
        chunk = n if compiled else max(1, CHUNK // bs) * bs  # chunks hold whole blocks
        parts = [_call("block", compiled, *_views([p, g, m, v, r], s, min(s + chunk, n)), hp,
                       block_size=bs, **flags) for s in range(0, n, chunk)]
        sq = torch.cat(parts)
        assert sq.numel() == num_blocks(n, bs)
        aux = sq > block_threshold(sq, spec.fraction)
    energy = torch.zeros((), dtype=torch.float64, device=dev)
    changed = torch.zeros((), dtype=torch.int64, device=dev)
    for s in range(0, n, chunk):
        dw = _scratch(min(chunk, n - s), dev) if compiled else None
        e, c = _call("fused", compiled, *_views([p, g, m, v, r, out_bf16], s, min(s + chunk, n)), dw,
                     hp, hi, aux, s, rule=spec.select, block_size=spec.block_size,
                     alpha=float(spec.alpha), **flags)
        if compiled:  # one more pass, over the stored change only
            e, c = _stored_energy(dw, float(spec.alpha))
        energy += e.double()
        changed += c
    return energy, changed
