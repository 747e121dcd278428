"""The reference masked optimizer step: plain torch, written to be read, not to be fast.

Every backend (the torch fallback, the Triton kernel) is tested against `reference_step`.

One step on a flat fp32 buffer p with gradient g:

1. Update the moments exactly as torch.optim.AdamW / torch.optim.SGD do, for EVERY element,
   selected or not. The moments are running statistics of the gradient, not of the applied
   change: freezing them for unselected weights would make a weight that is skipped for ten
   steps come back with ten-step-old statistics (and, for AdamW, with a bias correction that
   no longer matches its history). Keeping them current means selection only decides which
   part of the optimizer's candidate update is paid for, which is also what the per-coordinate
   derivation in DESIGN.md section 1 assumes (u is the optimizer's candidate update).
2. Form the candidate update u and the coordinate's effective step size eta:
     AdamW: u = -lr * m_hat / (sqrt(v_hat) + eps) - lr * wd * p,   eta = lr / (sqrt(v_hat) + eps)
     SGD:   d = g + wd * p; buf = momentum * buf + (1 - dampening) * d (buf = d on the first step);
            d = buf (or d + momentum * buf with nesterov);  u = -lr * d,  eta = lr
3. With residual mode, u_total = u + r (unselected updates of earlier steps), else u_total = u.
4. Select dw from u_total (see `select_update`), apply p_new = p + dw.
5. With residual mode, r_new = residual_decay * (u_total - dw). With decay 1 (the default)
   dw + r_new == u + r_old: nothing is lost (error feedback). Below 1 the unapplied part fades
   with a time constant of 1 / (1 - decay) steps, like the decaying transient weight of
   synaptic caching (RESEARCH.md section 1): a small update that keeps its sign builds up until
   it is selected, one whose sign flips cancels and fades without ever being paid for.
6. Energy of the APPLIED change, measured as d = p_new - p_old in fp32:
     metabolic = sum_i |d_i|^alpha  over d_i != 0 (0^0 := 0: an unchanged weight costs nothing),
     changed   = count of d_i != 0.
"""

from __future__ import annotations

import torch

from .spec import StepSpec, random_keep
from .threshold import block_threshold, num_blocks, sample_indices, topk_threshold


def candidate_update(p: torch.Tensor, g: torch.Tensor, state: dict, spec: StepSpec
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Update the moments in `state` in place for every element; return (u, eta)."""
    if spec.kind == "adamw":
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1.0 - spec.beta1)  # m = beta1 * m + (1 - beta1) * g, computed as torch does
        v.mul_(spec.beta2).addcmul_(g, g, value=1.0 - spec.beta2)
        denom = v.sqrt() / spec.bias_correction2_sqrt + spec.eps  # sqrt(v_hat) + eps
        u = -(spec.lr / spec.bias_correction1) * m / denom - spec.lr * spec.weight_decay * p
        eta = spec.lr / denom
        return u, eta
    d = g + spec.weight_decay * p
    if spec.momentum != 0.0:
        buf = state["momentum_buffer"]
        if spec.first:
            buf.copy_(d)
        else:
            buf.mul_(spec.momentum).add_(d, alpha=1.0 - spec.dampening)
        d = d + spec.momentum * buf if spec.nesterov else buf.clone()
    return -spec.lr * d, torch.full_like(p, spec.lr)


def select_update(u_total: torch.Tensor, eta: torch.Tensor, spec: StepSpec) -> torch.Tensor:
    """The part dw of u_total that is applied this step, under spec.select."""
    rule = spec.select
    n = u_total.numel()
    zero = torch.zeros_like(u_total)
    if rule == "dense":
        return u_total.clone()
    if rule == "soft":
        # argmin_dw  -u*dw/eta + dw^2/(2 eta) + price*|dw| + count_price*[dw != 0]:
        # shrink |u| by price*eta, then keep the shrunk update only when its gain
        # t^2/(2 eta) covers the fee for changing the weight at all (count_price 0: plain soft)
        t = torch.clamp(u_total.abs() - spec.price * eta, min=0.0)
        keep = t * t >= 2.0 * spec.count_price * eta
        return torch.where(keep, torch.sign(u_total) * t, zero)
    if rule == "hard":
        # keep u when its gain u^2/(2 eta) exceeds the price (written without the division)
        keep = u_total * u_total > 2.0 * spec.price * eta
    elif rule == "topk":
        idx = sample_indices(n, spec.seed, spec.step, spec.salt, u_total.device)
        thr = topk_threshold(u_total.abs()[idx], spec.fraction)
        keep = u_total.abs() > thr
    elif rule == "random":
        keep = random_keep(torch.arange(n, device=u_total.device), spec)
    elif rule == "block":
        bs = spec.block_size
        nb = num_blocks(n, bs)
        padded = torch.zeros(nb * bs, dtype=torch.float32, device=u_total.device)
        padded[:n] = u_total
        sq_norms = (padded.view(nb, bs) ** 2).sum(dim=1)
        thr = block_threshold(sq_norms, spec.fraction)
        keep = (sq_norms > thr).repeat_interleave(bs)[:n]
    else:
        raise ValueError(f"unknown select rule {rule!r}")
    return torch.where(keep, u_total, zero)


def reference_step(p: torch.Tensor, g: torch.Tensor, state: dict, spec: StepSpec,
                   out_bf16: torch.Tensor | None = None) -> tuple[float, int]:
    """One masked step on flat fp32 `p` in place; returns (metabolic energy, changed count).

    state holds fp32 buffers shaped like p: exp_avg/exp_avg_sq (adamw), momentum_buffer
    (sgd with momentum), residual (when spec.residual). out_bf16, if given, receives p_new
    rounded to bf16.
    """
    u, eta = candidate_update(p, g.float(), state, spec)
    u_total = u + state["residual"] if spec.residual else u
    dw = select_update(u_total, eta, spec)
    p_new = p + dw
    d = p_new - p  # the change that actually lands in fp32
    nonzero = d != 0
    if spec.alpha == 0.0:
        energy = float(nonzero.sum())
    else:
        energy = float(torch.where(nonzero, d.abs().double() ** spec.alpha, 0.0).sum())
    changed = int(nonzero.sum())
    if spec.residual:
        state["residual"].copy_(spec.residual_decay * (u_total - dw))
    p.copy_(p_new)
    if out_bf16 is not None:
        out_bf16.copy_(p_new.to(torch.bfloat16))
    return energy, changed
