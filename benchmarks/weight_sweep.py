"""Sweep of the masked optimizer's weight-selection rules against dense AdamW on one experiment.

topk at fractions 0.5, 0.2, 0.1, 0.05, 0.01; random at 0.1; hard and soft thresholds at three
prices; each without and with the residual. Prints test accuracy, energy/metabolic and
energy/changed_weights with ratios to dense (same process, same seed, same nominal epochs).

    python benchmarks/weight_sweep.py                                   # default experiment
    python benchmarks/weight_sweep.py --json data.limit=8192 train.epochs=3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from science import run_method  # noqa: E402

MASKED = ["optimizer.name=masked_adamw"]
PRICES = {"hard": (1e-7, 1e-6, 1e-5), "soft": (1e-4, 1e-3, 1e-2)}


def settings(residuals: list[bool]) -> list[tuple[str, list[str]]]:
    """The sweep's grid, as names that parse_setting turns into overrides."""
    names = []
    for res in residuals:
        tag = "+res" if res else ""
        names += [f"topk {f}{tag}" for f in (0.5, 0.2, 0.1, 0.05, 0.01)] + [f"random 0.1{tag}"]
        names += [f"{rule} {p:g}{tag}" for rule, prices in PRICES.items() for p in prices]
    return [("dense", [])] + [parse_setting(n) for n in names]


def parse_setting(name: str) -> tuple[str, list[str]]:
    """'topk 0.1+res' -> overrides; '+res0.9' adds residual_decay 0.9, 'soft 0.03/c1e-6' a
    count_price of 1e-6; any rule and value."""
    rule, _, value = name.strip().partition(" ")
    value, res, decay = value.partition("+res")
    value, _, count_price = value.partition("/c")
    if rule == "dense":
        return "dense", []
    key = "optimizer.fraction" if rule in ("topk", "random", "block") else "optimizer.price"
    flags = MASKED + [f"optimizer.residual={str(bool(res)).lower()}", f"optimizer.select={rule}", f"{key}={value}"]
    if decay:
        flags.append(f"optimizer.residual_decay={decay}")
    if count_price:
        flags.append(f"optimizer.count_price={count_price}")
    return name.strip(), flags


def chosen(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    if args.only:
        return [("dense", [])] + [parse_setting(n) for n in args.only.split(",")]
    return settings([False] if args.no_residual else [False, True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "fmnist_cnn.yaml"))
    parser.add_argument("--no-residual", action="store_true", help="skip the residual variants")
    parser.add_argument("--only", default=None,
                        help="comma list of extra settings to run after dense, e.g. 'topk 0.1+res,hard 1e-05+res0.9'")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None,
                        help="keep the runs here and append each finished row to OUT/rows.jsonl (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from metabolic.engine.distributed import init_distributed, shutdown_distributed

    info = init_distributed()
    rows = []
    tmp = None if args.out else tempfile.TemporaryDirectory()
    root = Path(args.out) if args.out else Path(tmp.name)
    for i, (name, extra) in enumerate(chosen(args)):
        s = run_method(info, Path(args.config), list(args.overrides) + extra, root / f"run{i}")
        rows.append({"setting": name, "eval/accuracy": s.get("eval/accuracy"), "eval/loss": s.get("eval/loss"),
                     "energy/metabolic": s["energy/metabolic"], "energy/changed_weights": s["energy/changed_weights"],
                     "energy/metabolic_min": s["energy/metabolic_min"]})
        if info.rank == 0:
            print(f"[sweep] {name}: {rows[-1]}", file=sys.stderr, flush=True)
            if args.out:  # a sweep cut short keeps the rows it finished
                with open(root / "rows.jsonl", "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    if tmp is not None:
        tmp.cleanup()
    dense = rows[0]
    # classifiers: accuracy and its difference in points; language models: validation loss and its
    # relative difference (lower is better)
    key = "eval/accuracy" if dense["eval/accuracy"] is not None else "eval/loss"
    for r in rows:
        r["energy_saving"] = dense["energy/metabolic"] / r["energy/metabolic"]
        r["changed_saving"] = dense["energy/changed_weights"] / max(r["energy/changed_weights"], 1)
        if key == "eval/accuracy":
            r["accuracy_delta_points"] = 100 * (r["eval/accuracy"] - dense["eval/accuracy"])
        else:
            r["loss_vs_dense_pct"] = 100 * (r["eval/loss"] / dense["eval/loss"] - 1)
    if info.rank == 0:
        if args.json:
            print(json.dumps(rows))
        else:
            label, delta = ("accuracy", "d points") if key == "eval/accuracy" else ("val loss", "vs dense %")
            print(f"{'setting':<18}{label:>10}{delta:>11}{'M':>12}{'M saving':>10}{'changed saving':>16}")
            for r in rows:
                d = r.get("accuracy_delta_points", r.get("loss_vs_dense_pct"))
                print(f"{r['setting']:<18}{r[key]:>10.4f}{d:>11.2f}{r['energy/metabolic']:>12.4g}"
                      f"{r['energy_saving']:>9.1f}x{r['changed_saving']:>15.1f}x")
    shutdown_distributed()


if __name__ == "__main__":
    main()
