"""Optimizer-step speed: torch fused AdamW vs the masked step for every selection rule.

    python benchmarks/optimizer_step.py [--params 25000000] [--device cpu|cuda] [--threads 1]
                                        [--backend auto|native|torch|triton] [--json]
    python benchmarks/optimizer_step.py --profile topk   # where one rule's step spends its time

One flat fp32 parameter of N elements with a fixed random gradient. Each rule's step alternates
with a fused AdamW step on its own copy (warmup also pays torch.compile / Triton autotuning);
ms is the median, ratio the median of the paired ratios, so a noisy machine hits both alike.
gbps is the dense AdamW traffic equivalent, 28 bytes/param (read p, g, m, v; write p, m, v) per
step time. The "ledger" row is not a rule: fused AdamW measured by the energy ledger (snapshot,
then diff), what the trainer does for optimizer.name=adamw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metabolic.kernels import MaskedAdamW
from metabolic.kernels.optimizer import BACKENDS

RULES = {
    "dense": dict(select="dense"),
    "topk": dict(select="topk", fraction=0.1),
    "hard": dict(select="hard", price=1e-4),
    "soft": dict(select="soft", price=0.3),
    "random": dict(select="random", fraction=0.1),
    "block": dict(select="block", fraction=0.1),
    # not a rule: fused AdamW measured by the energy ledger (snapshot before the step, diff after),
    # what the trainer does for optimizer.name=adamw
    "ledger": None,
}



def _sig(ms: float) -> float:
    """Four significant figures: a fixed number of decimals loses most of a tiny step's digits."""
    return float(f"{ms:.4g}")

def _once(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _paired(base, other, device: str, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Alternate the two steps so load drift on a shared machine hits both alike."""
    for _ in range(warmup):
        base()
        other()
    a, b = [], []
    for _ in range(repeats):
        a.append(_once(base, device))
        b.append(_once(other, device))
    return a, b


def _param(n: int, device: str) -> torch.nn.Parameter:
    gen = torch.Generator(device=device).manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, device=device, generator=gen))
    p.grad = torch.randn(n, device=device, generator=gen)
    return p


def _prime(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> None:
    """One step on a different gradient so moments look mid-training: from zero moments with a
    constant gradient AdamW's |u| is lr for every element, every kept fraction is a tie."""
    g = p.grad
    p.grad = torch.randn_like(g)
    opt.step()
    p.grad = g


def _measured_adamw(p: torch.nn.Parameter, n: int) -> torch.optim.Optimizer:
    """Fused AdamW with the energy ledger's hooks attached."""
    from metabolic.engine.ledger import EnergyLedger

    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    EnergyLedger(1.0, n, rank=0, world_size=1, use_optimizer_energy=False).attach(opt)
    return opt


def run(n: int, device: str, warmup: int, repeats: int, names: list[str] | None = None,
        backend: str = "auto") -> dict:
    """Each rule is timed in alternation with its own fused AdamW; ratio = median of paired ratios."""
    rules, fused_all = {}, []
    for name, kw in RULES.items():
        if names and name not in names:
            continue
        p_ref, p = _param(n, device), _param(n, device)
        fused = torch.optim.AdamW([p_ref], lr=1e-3, fused=True)
        opt = _measured_adamw(p, n) if kw is None else MaskedAdamW([p], lr=1e-3, backend=backend, **kw)
        _prime(fused, p_ref)
        _prime(opt, p)
        base, ms = _paired(fused.step, opt.step, device, warmup, repeats)
        fused_all += base
        rules[name] = {"ms": _sig(statistics.median(ms)),
                       "ratio": round(statistics.median(m / f for m, f in zip(ms, base)), 3),
                       "gbps": round(28 * n / statistics.median(ms) / 1e6, 1),
                       "fraction": round(opt.last_energy["fraction"], 4) if kw is not None else 1.0}
        del fused, opt, p, p_ref
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"params": n, "device": device, "backend": backend, "threads": torch.get_num_threads(),
            "fused_adamw_ms": _sig(statistics.median(fused_all)), "rules": rules}


def profile(n: int, device: str, rule: str, backend: str, steps: int = 20) -> str:
    """torch.profiler over `steps` masked steps of one rule: top ops by host time and by device
    time (at a few million params a GPU step is bound by launches on the host)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    p = _param(n, device)
    opt = MaskedAdamW([p], lr=1e-3, backend=backend, **RULES[rule])
    _prime(opt, p)
    for _ in range(3):  # compile / autotune outside the profile
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages()
    text = f"{steps} masked {rule} steps, {n:,} params on {device}\n"
    text += table.table(sort_by="self_cpu_time_total", row_limit=15)
    if device == "cuda":
        text += "\n" + table.table(sort_by="cuda_time_total", row_limit=10)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=25_000_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rules", default=",".join(RULES), help="comma list of rules to time")
    ap.add_argument("--backend", default="auto", choices=[b for b in BACKENDS if b != "reference"],
                    help="masked step backend (auto: Triton on CUDA, native C step on CPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--profile", default=None, metavar="RULE",
                    help="instead of timing: profile 20 steps of this rule (torch.profiler tables)")
    args = ap.parse_args()
    names = args.rules.split(",")
    unknown = sorted(set(names) - set(RULES))
    if unknown:
        ap.error(f"--rules: unknown {unknown}; choose from {list(RULES)}")
    if args.profile is not None and (args.profile not in RULES or args.profile == "ledger"):
        ap.error(f"--profile: unknown rule {args.profile!r}; choose from {[r for r in RULES if r != 'ledger']}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.profile:
        print(profile(args.params, args.device, args.profile, args.backend))
        return
    res = run(args.params, args.device, args.warmup, args.repeats, names, args.backend)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['params']:,} fp32 params on {res['device']}, backend {res['backend']}"
          + (f" ({res['threads']} thread(s))" if args.device == "cpu" else ""))
    print(f"{'step':<18}{'ms':>10}{'x fused':>10}{'GB/s':>8}{'kept':>8}")
    print(f"{'fused AdamW':<18}{res['fused_adamw_ms']:>10.2f}{1.0:>10.2f}"
          f"{28 * res['params'] / res['fused_adamw_ms'] / 1e6:>8.1f}{1.0:>8.3f}")
    for name, r in res["rules"].items():
        label = "AdamW + ledger" if name == "ledger" else "masked " + name
        print(f"{label:<18}{r['ms']:>10.2f}{r['ratio']:>10.2f}{r['gbps']:>8.1f}"
              f"{r['fraction']:>8.3f}")


if __name__ == "__main__":
    main()
