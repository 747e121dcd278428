"""Accuracy against energy: dense training vs the published data and weight methods vs one price.

Runs, with the same nominal epochs and seed: dense; pdd_difficulty; pdd_random; infobatch;
topk weights (fraction 0.1); random weights (0.1); the joint controller at two budgets (low and
high, as fractions of dense's energy/metabolic); and dense_matched, dense stopped at the number of
optimizer steps joint_low took (the fair baseline: a method that takes fewer steps must beat
simply training less); and dense_energy_low / _high, dense on a schedule shortened by the share
of dense's energy/metabolic that each joint run spent (a cosine run's spend scales with its
length), i.e. dense at about equal energy. Prints one table per task with each figure's ratio
to dense and a table of every run's metric at the joint runs' energies (interpolated between
its evaluations), writes a plot, and with --json prints the rows: task, method, overrides, the
metrics named in README.md's Training section, and ratio/<metric> to dense for each of them.

    python benchmarks/science.py --quick          # CI-sized: small subsets, ~minutes on 2 cores
    python benchmarks/science.py                  # full: default Fashion-MNIST experiment and lm_tiny
    python benchmarks/science.py --tasks fmnist --json --out runs/science
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (method, overrides); joint budgets and dense_matched's steps are filled in from earlier runs.
METHODS = [
    ("dense", []),
    ("pdd_difficulty", ["data.policy=pdd_difficulty"]),
    ("pdd_random", ["data.policy=pdd_random"]),
    ("infobatch", ["data.policy=infobatch"]),
    ("topk", ["optimizer.name=masked_adamw", "optimizer.select=topk", "optimizer.fraction=0.1"]),
    ("random_weights", ["optimizer.name=masked_adamw", "optimizer.select=random", "optimizer.fraction=0.1"]),
    ("joint_low", "joint"),
    ("joint_high", "joint"),
    ("dense_matched", "matched"),
    ("dense_energy_low", "energy:joint_low"),
    ("dense_energy_high", "energy:joint_high"),
]
JOINT = ["optimizer.name=masked_adamw", "optimizer.select=soft", "data.policy=price", "energy.controller=true",
         "energy.price=0.001", "energy.price_step=0.05", "energy.data_units=relative"]

TASKS = {
    "fmnist": {"config": REPO / "configs" / "fmnist_cnn.yaml", "metric": "eval/accuracy",
               "joint": [],
               # data-policy settings tuned on this experiment (benchmarks/RESULTS.md); lm_tiny uses the defaults
               "methods": {"pdd_difficulty": ["data.tau=0.85", "data.screen=true"], "pdd_random": ["data.gamma=0.65"]},
               "quick": ["data.limit=1024", "data.eval_limit=500", "train.epochs=2", "model.width=8",
                         "train.micro_batch_size=64", "train.log_every=8", "train.warmup_steps=8"]},
    "lm_tiny": {"config": REPO / "configs" / "lm_tiny.yaml", "metric": "eval/loss", "joint": [],
                "quick": ["data.text.corpus=files", "data.text.tokenizer=byte", "data.text.seq_len=64",
                          "model.width=32", "model.depth=2", "model.heads=2", "data.limit=256",
                          "data.eval_limit=64", "train.epochs=2", "train.micro_batch_size=16",
                          "train.eval_batch_size=16", "train.log_every=8", "train.warmup_steps=8"]},
}
BUDGETS = {"joint_low": 0.05, "joint_high": 0.2}  # fractions of dense energy/metabolic
KEYS = ("eval/accuracy", "eval/loss", "data/effective_epochs", "data/samples_forward", "data/samples_backward",
        "energy/metabolic", "energy/metabolic_min", "energy/metabolic_ratio", "energy/changed_weights",
        "compute/flops", "time/wall_s", "step")


def run_method(info, config: Path, overrides: list[str], out: Path, resume: bool = False) -> dict:
    """Train one configuration in this process (the process group is shared by all runs);
    resume: continue a run of this method that was cut short (its folder already exists)."""
    from metabolic.engine.config import load_config
    from metabolic.engine.trainer import Trainer

    again = ["resume=true"] if resume and out.exists() else []
    cfg = load_config(config, overrides + [f"output_dir={out}", "train.progress=false"] + again)
    return Trainer(cfg, info).run()


def run_task(info, name: str, quick: bool, root: Path, corpus: Path | None, overrides: list[str],
             reused: list[dict], resume: bool = False) -> list[dict]:
    task = TASKS[name]
    base = (list(task["quick"]) if quick else []) + overrides
    if name == "lm_tiny" and quick:
        base.append(f"data.path={corpus}")
    rows, by_method = [], {}
    done = {r["method"]: r for r in reused if r["task"] == name}
    for method, extra in METHODS:
        if method in done:  # --resume: a finished run's row stands in for its summary
            rows.append(done[method])
            by_method[method] = done[method]
            continue
        if extra == "joint":
            budget = BUDGETS[method] * by_method["dense"]["energy/metabolic"]
            extra = JOINT + task["joint"] + [f"energy.budget={budget}"]
        elif extra == "matched":
            extra = [f"train.max_steps={by_method['joint_low']['step']}"]
        elif isinstance(extra, str) and extra.startswith("energy:"):
            # dense on a schedule shortened to spend what the joint run spent
            dense, joint = by_method["dense"], by_method[extra.split(":")[1]]
            steps = max(1, round(dense["step"] * joint["energy/metabolic"] / dense["energy/metabolic"]))
            extra = [f"train.max_steps={steps}"]
        extra = list(extra) + task.get("methods", {}).get(method, [])
        summary = run_method(info, task["config"], base + extra, root / name / method, resume)
        by_method[method] = summary
        row = {"task": name, "method": method, "overrides": base + extra, **{k: summary.get(k) for k in KEYS}}
        rows.append(row)
        if info.rank == 0:
            with open(root / "rows.jsonl", "a") as f:  # a run cut short keeps the rows it finished
                f.write(json.dumps(row) + "\n")
            print(f"[science] {name}/{method}: {task['metric']}={summary.get(task['metric'])} "
                  f"M={summary['energy/metabolic']:.4g}", file=sys.stderr, flush=True)
    dense = by_method["dense"]
    for row in rows:
        for k in KEYS:
            if isinstance(row.get(k), (int, float)) and dense.get(k):
                row[f"ratio/{k}"] = row[k] / dense[k]
    return rows


def print_table(rows: list[dict], metric: str) -> None:
    from metabolic.engine.report import format_table

    dense = next(r for r in rows if r["method"] == "dense")
    print(format_table([(r["method"], r) for r in rows], baseline=dense))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subsets for CI-sized checks")
    parser.add_argument("--tasks", default="fmnist,lm_tiny", help="comma list of fmnist, lm_tiny")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in OUT/rows.jsonl and run only the missing methods (a method "
                             "whose folder exists is continued from its checkpoint: delete the folder to rerun it)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. data.path=DIR")
    args = parser.parse_args()

    from metabolic.data.text import shakespeare_files
    from metabolic.engine.distributed import init_distributed, shutdown_distributed
    from metabolic.engine.report import at_energy_table, compare, load_run

    info = init_distributed()
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.out) if args.out else Path(tmp.name)
    reused = []
    if args.resume:
        if not args.out:
            raise SystemExit("--resume needs --out (the folder of the earlier rows.jsonl)")
        path = root / "rows.jsonl"
        reused = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if info.rank == 0:
            print(f"[science] reusing {len(reused)} rows from {path}", file=sys.stderr, flush=True)
    corpus = None
    if args.quick and "lm_tiny" in args.tasks:
        corpus = root / "corpus"
        if info.rank == 0:
            corpus.mkdir(parents=True, exist_ok=True)
            for f in shakespeare_files()[:3]:
                (corpus / f.name).write_text(f.read_text(encoding="utf-8", errors="replace"))
    all_rows = []
    for name in args.tasks.split(","):
        if name not in TASKS:
            raise SystemExit(f"unknown task {name!r}; choose from {sorted(TASKS)}")
        rows = run_task(info, name, args.quick, root, corpus, list(args.overrides), reused, args.resume)
        all_rows += rows
        if info.rank == 0 and not args.json:
            print(f"== {name} ({'quick' if args.quick else 'full'}): ratios to dense in parentheses")
            print_table(rows, TASKS[name]["metric"])
            # rows reused by --resume may come from runs kept elsewhere: plot the runs that are here
            dirs = [root / name / r["method"] for r in rows]
            here = [d for d in dirs if (d / "metrics.jsonl").exists()]
            if len(here) < len(dirs):
                print(f"plot leaves out runs not under {root / name}: "
                      f"{', '.join(d.name for d in dirs if d not in here)}")
            if here:
                levels = [r["energy/metabolic"] for r in rows if r["method"].startswith("joint_")]
                print(at_energy_table([(d.name, load_run(d)[1]) for d in here], levels))
                print(compare(here, out=root / f"{name}_compare.png").splitlines()[-1])
    if info.rank == 0 and args.json:
        print(json.dumps(all_rows))
    shutdown_distributed()
    tmp.cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
