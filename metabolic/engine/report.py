"""Reports of runs: a figures table and plots for one run, and comparisons of several.

Everything is read from a run folder's summary.json and metrics.jsonl (the ledger's figures),
so a report can be made at any time, on any machine. A run without summary.json (still running,
preempted or diverged) is reported from its last record and marked unfinished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from metabolic.engine.metrics import read_jsonl

# Figures of the table, in order: (metric, header).
TABLE = (("eval/accuracy", "accuracy"), ("eval/loss", "eval loss"), ("data/effective_epochs", "eff. epochs"),
         ("data/samples_forward", "fwd samples"), ("data/samples_backward", "bwd samples"),
         ("energy/metabolic", "M"), ("energy/metabolic_min", "M_min"), ("energy/metabolic_ratio", "M/M_min"),
         ("energy/changed_weights", "changed w"), ("compute/flops", "FLOPs"), ("time/wall_s", "wall s"))


class RunMissingError(FileNotFoundError):
    """The folder holds no run (neither summary.json nor metric records)."""


def load_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """(summary, metric records); an unfinished run's summary is its last record, with the figures
    of its last evaluation, and status "unfinished"."""
    run_dir = Path(run_dir)
    path, metrics = run_dir / "summary.json", run_dir / "metrics.jsonl"
    records = read_jsonl(metrics) if metrics.is_file() else []
    if path.is_file():
        return json.loads(path.read_text()), records
    if not records:
        raise RunMissingError(f"'{run_dir}' holds no run (no summary.json, no records in metrics.jsonl)")
    summary = dict(records[-1], status="unfinished")
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if evals and evals[-1] is not records[-1]:
        summary.update({k: v for k, v in evals[-1].items() if k.startswith("eval/")}, eval_step=evals[-1]["step"])
    # The per-epoch plan a finished run's summary holds, rebuilt from the records of the epochs seen.
    plans = {r["data/plan_epoch"]: r.get("data/kept_fraction") for r in records if "data/plan_epoch" in r}
    summary["epochs"] = [{"epoch": e, "kept_fraction": k} for e, k in sorted(plans.items())]
    last = records[-1]
    if last.get("data/effective_epochs") and last.get("data/samples_backward"):
        summary["dataset_size"] = round(last["data/samples_backward"] / last["data/effective_epochs"])
    return summary, records


def run_name(run_dir: str | Path, summary: dict) -> str:
    """The folder's name; an unfinished run's says so, with its last step."""
    name = Path(run_dir).name
    return name if summary.get("status", "completed") == "completed" else f"{name} (unfinished, step {summary['step']})"


def eval_curve(records: list[dict]) -> tuple[str, list[dict]]:
    """The eval metric a run reports (accuracy for classifiers, else loss) and the records holding it."""
    key = "eval/accuracy" if any(r.get("eval/accuracy") is not None for r in records) else "eval/loss"
    return key, [r for r in records if r.get(key) is not None]


def metric_at(records: list[dict], x: float, xkey: str = "energy/metabolic") -> Optional[float]:
    """The run's eval metric when its `xkey` (cumulative) reached x, interpolated linearly between
    evaluations; a run that never spent x ends below it, so its last value stands. None when x
    comes before the first evaluation (nothing measured there)."""
    key, evals = eval_curve(records)
    points = [(r[xkey], r[key]) for r in evals if r.get(xkey) is not None]
    if not points or x < points[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def at_energy_table(runs: list[tuple[str, list[dict]]], levels: list[float]) -> str:
    """Each run's eval metric at each level of energy/metabolic ("-": no evaluation that early)."""
    key = eval_curve(runs[0][1])[0] if runs else "eval"
    rows = [["run"] + [f"{key} at M={_fmt(m)}" for m in levels]]
    for name, records in runs:
        rows.append([name] + ["-" if v is None else _fmt(v) for v in (metric_at(records, m) for m in levels)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def epoch_fractions(summary: dict, records: list[dict]) -> list[dict]:
    """Per epoch: kept-sample fraction (the data plan), trained-sample fraction (backward samples
    over the dataset: below the plan under data.screen, above it by wrap padding) and
    changed-weight fraction (the ledger)."""
    out = []
    ends = {}
    for r in records:  # records carry the epoch count reached: the FIRST with e + 1 is epoch e's end
        ends.setdefault(r["epoch"], r)
    n = summary.get("dataset_size")
    prev_changed, prev_step, prev_backward = 0, 0, 0
    for plan in summary.get("epochs", []):
        e = plan["epoch"]
        end = ends.get(e + 1)
        changed_frac = trained_frac = None
        if end is not None:
            if n and end.get("data/samples_backward") is not None:
                trained_frac = (end["data/samples_backward"] - prev_backward) / n
                prev_backward = end["data/samples_backward"]
            if end.get("energy/num_weights"):
                steps = end["step"] - prev_step
                if steps > 0:
                    changed_frac = (end["energy/changed_weights"] - prev_changed) / (steps * end["energy/num_weights"])
                prev_changed, prev_step = end["energy/changed_weights"], end["step"]
        out.append({"epoch": e, "kept_fraction": plan.get("kept_fraction"), "trained_fraction": trained_frac,
                    "changed_fraction": changed_frac})
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def format_table(rows: list[tuple[str, dict]], baseline: Optional[dict] = None) -> str:
    """Rows of figures as an aligned text table; with a baseline, each figure is followed by its ratio."""
    cols = [(k, h) for k, h in TABLE if any(r.get(k) is not None for _, r in rows)]
    header = ["run"] + [h for _, h in cols]
    lines = []
    for name, r in rows:
        cells = [name]
        for k, _ in cols:
            cell = _fmt(r.get(k))
            if baseline is not None and isinstance(r.get(k), (int, float)) and baseline.get(k):
                cell += f" ({r[k] / baseline[k]:.2f}x)"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, out_name: str = "report.png") -> Path:
    """Eval metric against metabolic energy, samples back-propagated and wall time; per-epoch fractions."""
    plt = _plt()
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    key, evals = eval_curve(read_jsonl(run_dir / "metrics.jsonl"))
    if not evals:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no eval records to plot")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, xkey, xlabel in ((axes[0], "energy/metabolic", "metabolic energy  sum |dw|^alpha"),
                             (axes[1], "data/samples_backward", "samples back-propagated"),
                             (axes[2], "time/wall_s", "wall time (s)")):
        ax.plot([r[xkey] for r in evals], [r[key] for r in evals], marker="o")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fr = epoch_fractions(summary, read_jsonl(run_dir / "metrics.jsonl"))
    axes[3].plot([f["epoch"] for f in fr], [f["kept_fraction"] for f in fr], marker="o", label="kept samples (plan)")
    axes[3].plot([f["epoch"] for f in fr], [f["trained_fraction"] for f in fr], marker="^", label="trained samples")
    axes[3].plot([f["epoch"] for f in fr], [f["changed_fraction"] for f in fr], marker="s", label="changed weights")
    axes[3].set_xlabel("epoch")
    axes[3].set_ylabel("fraction")
    axes[3].set_ylim(0, 1.05)
    axes[3].legend()
    axes[3].grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / out_name
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(run_dir: str | Path) -> str:
    """The run's figures and per-epoch fractions as text; also (re)writes report.png."""
    summary, records = load_run(run_dir)
    text = format_table([(run_name(run_dir, summary), summary)])
    fr = epoch_fractions(summary, records)
    if fr:
        text += "\n\nepoch  kept_fraction  trained_fraction  changed_fraction\n"
        text += "\n".join(f"{f['epoch']:<5}  {_fmt(f['kept_fraction']):<13}  {_fmt(f['trained_fraction']):<16}  "
                           f"{_fmt(f['changed_fraction'])}" for f in fr)
    if eval_curve(records)[1]:
        text += f"\n\nplots: {plot_run(run_dir)}"
    else:
        text += "\n\nno evaluation yet: report.png not written"
    return text


def compare(run_dirs: list[str | Path], out: Optional[str | Path] = None,
            at_energy: Optional[list[float]] = None) -> str:
    """Runs side by side with each figure's ratio to the first run (the baseline); writes one plot.
    at_energy: also each run's eval metric when it had spent each of these energy/metabolic levels
    (accuracy at equal energy, from the evaluations along the run)."""
    runs = [(run_name(d, s), s, r) for d in run_dirs for s, r in [load_run(d)]]
    metrics = {name: eval_curve(r)[0] for name, _, r in runs if eval_curve(r)[1]}
    if len(set(metrics.values())) > 1:  # one table column, one plot axis: one metric
        raise ValueError("compare: the runs report different eval metrics ("
                         + ", ".join(f"{n}: {k}" for n, k in metrics.items()) + "); compare runs of one task")
    baseline = runs[0][1]
    text = format_table([(name, s) for name, s, _ in runs], baseline=baseline)
    if at_energy:
        text += "\n\n" + at_energy_table([(name, r) for name, _, r in runs], at_energy)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, _, records in runs:
        key, evals = eval_curve(records)
        for ax, xkey in ((axes[0], "energy/metabolic"), (axes[1], "data/samples_backward")):
            ax.plot([r[xkey] for r in evals], [r[key] for r in evals], marker="o", label=name)
            ax.set_xlabel(xkey)
            ax.set_ylabel(key)
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dirs[0]).parent / "compare.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return text + f"\n\nplot: {path}"
