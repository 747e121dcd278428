"""Plots of a run: accuracy (or eval loss) against metabolic energy and against samples_backward."""

from __future__ import annotations

from pathlib import Path

from metabolic.engine.metrics import read_jsonl


def eval_curve(records: list[dict]) -> tuple[str, list[dict]]:
    """The eval metric a run reports (accuracy for classifiers, else loss) and the records holding it."""
    key = "eval/accuracy" if any(r.get("eval/accuracy") is not None for r in records) else "eval/loss"
    return key, [r for r in records if r.get(key) is not None]


def plot_run(run_dir: str | Path, out_name: str = "report.png") -> Path:
    """Write `report.png` in run_dir from its metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    key, evals = eval_curve(read_jsonl(run_dir / "metrics.jsonl"))
    if not evals:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no eval records to plot")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, xkey, xlabel in ((axes[0], "energy/metabolic", "metabolic energy  sum |dw|^alpha"),
                             (axes[1], "data/samples_backward", "samples back-propagated")):
        ax.plot([r[xkey] for r in evals], [r[key] for r in evals], marker="o")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / out_name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
