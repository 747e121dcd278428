"""Triton kernel of the masked step, for CUDA tensors (and CPU through TRITON_INTERPRET=1).

One program per BLOCK elements of the flat buffer fuses: moment update, candidate update u,
residual, selection against a precomputed threshold / price / hash / block flag, apply,
residual write-back, optional bf16 copy of the new weights, and per-program partial sums of
energy and changed count. Partials go to a buffer (one slot per program, no float atomics) and
are summed with torch afterwards, so results are deterministic run to run.

Thresholds are device tensors computed before the launch (threshold.py), so no host sync:
- topk: `_sample_abs_kernel` computes |u_total| at the ~16K positions of
  threshold.sample_indices in one launch -> midpoint threshold (same rule as the fallback).
- block: pass 1 (`_block_sq_kernel`) writes each block's squared L2 norm of u_total without
  touching any state; torch picks the top fraction of blocks; pass 2 is the main kernel reading
  a per-block keep flag. The candidate is computed twice; the alternative (materialising u)
  moves more bytes than it saves.

Autotuning re-runs the kernel on the real buffers, so every in-place argument is listed in
`restore_value` and the partial sums in `reset_to_zero`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .spec import StepSpec, hash_base
from .threshold import SAMPLE_SIZE, block_threshold, num_blocks, sample_key, topk_threshold

RULE_IDS = {"dense": 0, "topk": 1, "hard": 2, "soft": 3, "random": 4, "block": 5}
MIN_BLOCK = 1024


@triton.jit
def _fmix32(h):
    # murmur3 finaliser on uint32; must stay bit-identical to spec.element_hash
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _load_state(p_ptr, g_ptr, m_ptr, v_ptr, r_ptr, offs, mask, KIND: tl.constexpr, HAS_MOM: tl.constexpr,
                RESIDUAL: tl.constexpr):
    # Unused state slots alias p: the constexpr flags remove their loads and uses at compile time.
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = p
    v = p
    r = p
    if HAS_MOM:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    if KIND == 0:
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if RESIDUAL:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
    return p, g, m, v, r


@triton.jit
def _candidate(p, g, m, v, r, lr, wd, c1, c2, c3, eps, step_size, bc2_sqrt, mom_a, mom_b, mom,
               KIND: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
               RESIDUAL: tl.constexpr):
    """(u_total, eta, new m / momentum buffer, new v); same formulas as fallback._candidate."""
    if KIND == 0:
        # torch.lerp(m, g, c1), including its two-sided formula
        m_new = tl.where(c1 < 0.5, m + c1 * (g - m), g - (g - m) * (1.0 - c1))
        v_new = v * c2 + c3 * (g * g)
        denom = tl.sqrt_rn(v_new) / bc2_sqrt + eps
        u = -tl.div_rn(step_size * m_new, denom) - lr * wd * p
        eta = tl.div_rn(lr + tl.zeros_like(denom), denom)
    else:
        d = g + wd * p
        if HAS_MOM:
            m_new = mom_a * m + mom_b * d
            if NESTEROV:
                d = d + mom * m_new
            else:
                d = m_new
        else:
            m_new = d
        v_new = d
        u = -lr * d
        eta = lr + tl.zeros_like(d)
    if RESIDUAL:
        u = u + r
    return u, eta, m_new, v_new


@triton.jit(do_not_specialize=["rand_key", "rand_thr"])
def _masked_step_kernel(p_ptr, g_ptr, m_ptr, v_ptr, r_ptr, pbf_ptr, thr_ptr, keep_ptr,
                        part_e_ptr, part_c_ptr, n, size_class,
                        lr, wd, c1, c2, c3, eps, step_size, bc2_sqrt, price, mom_a, mom_b, mom,
                        alpha, block_size, decay, count_price, rand_key, rand_thr,
                        KIND: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
                        RESIDUAL: tl.constexpr, RULE: tl.constexpr, ALPHA_MODE: tl.constexpr,
                        HAS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p, g, m, v, r = _load_state(p_ptr, g_ptr, m_ptr, v_ptr, r_ptr, offs, mask, KIND, HAS_MOM, RESIDUAL)
    u, eta, m_new, v_new = _candidate(p, g, m, v, r, lr, wd, c1, c2, c3, eps, step_size,
                                      bc2_sqrt, mom_a, mom_b, mom, KIND, HAS_MOM, NESTEROV,
                                      RESIDUAL)
    zero = tl.zeros_like(u)
    if RULE == 0:
        dw = u
    elif RULE == 3:
        sign = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
        t = tl.maximum(tl.abs(u) - price * eta, 0.0)
        dw = tl.where(t * t >= 2.0 * count_price * eta, sign * t, zero)
    else:
        if RULE == 1:
            keep = tl.abs(u) > tl.load(thr_ptr)
        elif RULE == 2:
            keep = u * u > 2.0 * price * eta
        elif RULE == 4:
            # rand_key: hash_base as an int32 bit pattern (a scalar, so no copy to the device)
            h = _fmix32(offs.to(tl.uint32) ^ rand_key.to(tl.uint32, bitcast=True))
            keep = (h >> 8).to(tl.int32) < rand_thr
        else:
            keep = tl.load(keep_ptr + offs // block_size, mask=mask, other=0) != 0
        dw = tl.where(keep, u, zero)
    p_new = p + dw
    d = p_new - p
    nz = (d != 0.0) & mask
    if ALPHA_MODE == 0:
        e = nz.to(tl.float32)
    elif ALPHA_MODE == 1:
        e = tl.abs(d)
    else:
        e = tl.where(nz, tl.exp2(alpha * tl.log2(tl.abs(d) + (1.0 - nz.to(tl.float32)))), zero)
    tl.store(part_e_ptr + pid, tl.sum(tl.where(mask, e, zero), axis=0))
    tl.store(part_c_ptr + pid, tl.sum(nz.to(tl.int32), axis=0))
    tl.store(p_ptr + offs, p_new, mask=mask)
    if HAS_MOM:
        tl.store(m_ptr + offs, m_new, mask=mask)
    if KIND == 0:
        tl.store(v_ptr + offs, v_new, mask=mask)
    if RESIDUAL:
        tl.store(r_ptr + offs, decay * (u - dw), mask=mask)  # residual_decay; 1 is exact
    if HAS_BF16:
        tl.store(pbf_ptr + offs, p_new.to(tl.bfloat16), mask=mask)


@triton.jit
def _block_sq_kernel(p_ptr, g_ptr, m_ptr, v_ptr, r_ptr, out_ptr, n, block_size,
                     lr, wd, c1, c2, c3, eps, step_size, bc2_sqrt, mom_a, mom_b, mom,
                     KIND: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
                     RESIDUAL: tl.constexpr, CHUNK: tl.constexpr):
    # pass 1 of the block rule: squared L2 norm of u_total per block, no writes to state
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for s in range(0, block_size, CHUNK):
        within = s + tl.arange(0, CHUNK)
        offs = b * block_size + within
        mask = (within < block_size) & (offs < n)
        p, g, m, v, r = _load_state(p_ptr, g_ptr, m_ptr, v_ptr, r_ptr, offs, mask, KIND, HAS_MOM, RESIDUAL)
        u, eta, m_new, v_new = _candidate(p, g, m, v, r, lr, wd, c1, c2, c3, eps, step_size,
                                          bc2_sqrt, mom_a, mom_b, mom, KIND, HAS_MOM,
                                          NESTEROV, RESIDUAL)
        u = tl.where(mask, u, 0.0)
        acc += u * u
    tl.store(out_ptr + b, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["key"])
def _sample_abs_kernel(p_ptr, g_ptr, m_ptr, v_ptr, r_ptr, out_ptr, n, S, key,
                       lr, wd, c1, c2, c3, eps, step_size, bc2_sqrt, mom_a, mom_b, mom,
                       KIND: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
                       RESIDUAL: tl.constexpr, CHUNK: tl.constexpr):
    # |u_total| at threshold.sample_indices' positions, in one launch instead of ~40 small ones;
    # S = min(n, SAMPLE_SIZE), so S == n gives start = stratum, width = 1 (every position).
    stratum = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    smask = stratum < S
    s64 = stratum.to(tl.int64)
    start = (s64 * n) // S
    width = ((s64 + 1) * n) // S - start
    jitter = _fmix32(stratum.to(tl.uint32) ^ key.to(tl.uint32, bitcast=True)).to(tl.int64)
    offs = start + jitter % width
    p, g, m, v, r = _load_state(p_ptr, g_ptr, m_ptr, v_ptr, r_ptr, offs, smask, KIND, HAS_MOM, RESIDUAL)
    u, eta, m_new, v_new = _candidate(p, g, m, v, r, lr, wd, c1, c2, c3, eps, step_size,
                                      bc2_sqrt, mom_a, mom_b, mom, KIND, HAS_MOM, NESTEROV,
                                      RESIDUAL)
    tl.store(out_ptr + stratum, tl.abs(u), mask=smask)


_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)]
_masked_step_autotuned = triton.autotune(
    configs=_CONFIGS, key=["size_class"],
    restore_value=["p_ptr", "m_ptr", "v_ptr", "r_ptr", "pbf_ptr"],
    reset_to_zero=["part_e_ptr", "part_c_ptr"],
)(_masked_step_kernel)


def _i32(x: int) -> int:
    """The int32 bit pattern of a uint32 (kernels bitcast it back)."""
    return x - (1 << 32) if x >= (1 << 31) else x


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_step(p: torch.Tensor, g: torch.Tensor, state: dict, spec: StepSpec,
                out_bf16: torch.Tensor | None = None, block: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked step on contiguous flat fp32 `p` in place; returns 0-d (energy f64, changed i64).

    block: fixed BLOCK (skips autotuning); default autotunes on GPU and uses 4096 when
    interpreting (the interpreter's cost is per program).
    """
    n = p.numel()
    dev = p.device
    has_mom = spec.kind == "adamw" or spec.momentum != 0.0
    m = (state.get("exp_avg", state.get("momentum_buffer")) if has_mom else None)
    v = state.get("exp_avg_sq")
    r = state.get("residual") if spec.residual else None
    if spec.kind == "adamw":
        sc = dict(lr=spec.lr, wd=spec.weight_decay, c1=1.0 - spec.beta1, c2=spec.beta2,
                  c3=1.0 - spec.beta2, eps=spec.eps, step_size=spec.lr / spec.bias_correction1,
                  bc2_sqrt=spec.bias_correction2_sqrt, mom_a=0.0, mom_b=0.0, mom=0.0)
    else:
        sc = dict(lr=spec.lr, wd=spec.weight_decay, c1=0.0, c2=0.0, c3=0.0, eps=0.0,
                  step_size=0.0, bc2_sqrt=1.0, mom_a=0.0 if spec.first else spec.momentum,
                  mom_b=1.0 if spec.first else 1.0 - spec.dampening, mom=spec.momentum)
    flags = dict(KIND=0 if spec.kind == "adamw" else 1, HAS_MOM=has_mom,
                 NESTEROV=bool(spec.nesterov), RESIDUAL=bool(spec.residual))
    dummy = p
    # At a few million elements the step is bound by launches on the host, so no allocation or
    # copy is made that the rule does not read: unused pointer slots alias p.
    thr = keep = dummy
    state_ptrs = (dummy if m is None else m, dummy if v is None else v, dummy if r is None else r)
    if spec.select == "topk":
        S = min(n, SAMPLE_SIZE)
        u_abs = torch.empty(S, dtype=torch.float32, device=dev)
        key = _i32(sample_key(spec.seed, spec.step, spec.salt))
        _sample_abs_kernel[(triton.cdiv(S, 1024),)](p, g, *state_ptrs, u_abs, n, S, key, **sc,
                                                    **flags, CHUNK=1024)
        thr = topk_threshold(u_abs, spec.fraction).reshape(1)
    elif spec.select == "block":
        nb = num_blocks(n, spec.block_size)
        sq = torch.empty(nb, dtype=torch.float32, device=dev)
        chunk = min(triton.next_power_of_2(spec.block_size), 4096 if _interpreting() else 1024)
        _block_sq_kernel[(nb,)](p, g, *state_ptrs, sq, n, spec.block_size, **sc, **flags,
                                CHUNK=chunk)
        keep = (sq > block_threshold(sq, spec.fraction)).to(torch.int8)
    # one slot per program of the smallest BLOCK; energies as fp32 bits next to the counts, so
    # a single fill zeroes both
    nparts = triton.cdiv(n, MIN_BLOCK)
    parts = torch.zeros(2 * nparts, dtype=torch.int32, device=dev)
    part_e, part_c = parts[:nparts].view(torch.float32), parts[nparts:]
    alpha_mode = 0 if spec.alpha == 0.0 else (1 if spec.alpha == 1.0 else 2)
    args = (p, g, *state_ptrs, dummy if out_bf16 is None else out_bf16, thr, keep, part_e,
            part_c, n, triton.next_power_of_2(n))
    kw = dict(**sc, price=spec.price, alpha=float(spec.alpha), block_size=spec.block_size,
              decay=float(spec.residual_decay), count_price=float(spec.count_price),
              rand_key=_i32(hash_base(spec.seed, spec.step, spec.salt)),
              rand_thr=spec.random_threshold, RULE=RULE_IDS[spec.select],
              ALPHA_MODE=alpha_mode, HAS_BF16=out_bf16 is not None, **flags)
    if block is None and _interpreting():
        block = 4096
    if block is None:
        _masked_step_autotuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args, **kw)
    else:
        assert block >= MIN_BLOCK and block & (block - 1) == 0, "block must be a power of 2 >= 1024"
        _masked_step_kernel[(triton.cdiv(n, block),)](*args, **kw, BLOCK=block, num_warps=4)
    return part_e.sum(dtype=torch.float64), part_c.sum(dtype=torch.int64)
