"""`metabolic submit`: render an sbatch script into the run folder and submit it.

The script (`<output_dir>/slurm/job.sbatch`) comes from one of the templates in `slurm/`
(CPU or GPU, single- or multi-node) plus the shared body `slurm/job_body.sh`. Every value from
the experiment enters the script through shlex.quote, and sbatch is run from an argv list, so
no config value is ever parsed as shell text. The job runs one task per node; `srun` starts
`metabolic launch` on each node (which execs `accelerate launch`) against the head node's
address. Logs: `<output_dir>/slurm/<jobid>.out`, appended to across requeues.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
BODY = "job_body.sh"
SCRIPT_NAME = "job.sbatch"
LOG_SUBDIR = "slurm"
_SAFE_DIRECTIVE = re.compile(r"^[A-Za-z0-9_.,:+@%/=-]+$")  # what may appear in an #SBATCH line unquoted
_PARTITION = re.compile(r"^[A-Za-z0-9_.,-]+$")
_TIME = re.compile(r"^[0-9]+(-[0-9]+)?(:[0-9]+){0,2}$|^[0-9]+(:[0-9]+){0,2}$")


class SubmitError(ValueError):
    """A submit request that cannot work (bad resource values, no sbatch, a run already there)."""


@dataclass
class SubmitSpec:
    config: str
    overrides: list[str]
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: Optional[int] = None  # default: gpus_per_node, or 1 on CPU
    cpus_per_node: Optional[int] = None  # default: procs_per_node
    partition: Optional[str] = None
    time: Optional[str] = None
    signal_seconds: int = 120
    accelerate_config: Optional[str] = None
    python: str = sys.executable
    sbatch_args: list[str] = field(default_factory=list)

    @property
    def procs(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)


@dataclass
class Rendered:
    run_dir: Path
    script_path: Path
    script: str
    log_pattern: Path  # <run_dir>/slurm/%j.out
    sbatch_argv: list[str]


def template_name(spec: SubmitSpec) -> str:
    return f"{'gpu' if spec.gpus_per_node > 0 else 'cpu'}_{'single' if spec.nodes == 1 else 'multi'}_node.sbatch"


def _check(spec: SubmitSpec) -> None:
    if spec.nodes < 1:
        raise SubmitError(f"--nodes must be >= 1, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be >= 0, got {spec.gpus_per_node}")
    if spec.procs < 1:
        raise SubmitError(f"--procs-per-node must be >= 1, got {spec.procs}")
    if spec.cpus_per_node is not None and spec.cpus_per_node < 1:
        raise SubmitError(f"--cpus-per-node must be >= 1, got {spec.cpus_per_node}")
    if spec.partition is not None and not _PARTITION.match(spec.partition):
        raise SubmitError(f"--partition {spec.partition!r}: only letters, digits and _ . , - are allowed")
    if spec.time is not None and not _TIME.match(spec.time):
        raise SubmitError(f"--time {spec.time!r}: use minutes, MM:SS, HH:MM:SS, D-HH or D-HH:MM:SS")
    if spec.signal_seconds < 1:
        raise SubmitError(f"--signal-seconds must be >= 1, got {spec.signal_seconds}")


def _job_name(run_dir: Path) -> str:
    return "metabolic-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.name)[:40] or "run")


def _words(items) -> str:
    return " ".join(shlex.quote(str(x)) for x in items)


def render(spec: SubmitSpec, cwd: Optional[Path] = None) -> Rendered:
    """Validate the experiment and resources, and render the job script (nothing is written)."""
    from metabolic.engine.config import ConfigError  # noqa: F401  (load_experiment raises it)
    from metabolic.launcher.launch import LaunchSpec, check_against_accelerate_config, load_experiment

    _check(spec)
    cwd = Path(cwd or os.getcwd()).absolute()
    config = Path(spec.config)
    config = config if config.is_absolute() else cwd / config
    cfg = load_experiment(str(config), spec.overrides)
    check_against_accelerate_config(cfg, LaunchSpec(str(config), list(spec.overrides),
                                                    accelerate_config=spec.accelerate_config))
    out = Path(cfg.output_dir)
    run_dir = out if out.is_absolute() else cwd / out
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if holds_run and not cfg.resume:
        raise SubmitError(f"config key 'output_dir': '{run_dir}' already holds a run; pass resume=true to continue "
                          "it (the job resumes from its latest checkpoint) or choose another output_dir")
    # The job gets an absolute config and output_dir so it does not depend on where it starts;
    # resume=true last, so a requeued job continues from its checkpoint.
    experiment = [str(config), *spec.overrides, f"output_dir={run_dir}", "resume=true"]
    launch_extra = ["--accelerate-config", str(Path(spec.accelerate_config).absolute())] if spec.accelerate_config else []
    log_dir = run_dir / LOG_SUBDIR
    log_pattern = log_dir / "%j.out"
    output_line = (f"#SBATCH --output={log_pattern}" if _SAFE_DIRECTIVE.match(str(log_pattern))
                   else "# --output: given on the sbatch command line (the path needs quoting)")
    values = {
        "JOB_NAME": _job_name(run_dir),
        "NODES": str(spec.nodes),
        "GPUS_PER_NODE": str(spec.gpus_per_node),
        "CPUS_PER_NODE": str(spec.cpus_per_node or spec.procs),
        "PARTITION_LINE": f"#SBATCH --partition={spec.partition}" if spec.partition else "",
        "TIME_LINE": f"#SBATCH --time={spec.time}" if spec.time else "",
        "SIGNAL_SECONDS": str(spec.signal_seconds),
        "OUTPUT_LINE": output_line,
        "PYTHON": shlex.quote(str(spec.python)),
        "RUN_DIR": shlex.quote(str(run_dir)),
        "PROCS_PER_NODE": str(spec.procs),
        "EXPERIMENT": _words(experiment),
        "LAUNCH_EXTRA": _words(launch_extra),
    }
    text = (TEMPLATE_DIR / template_name(spec)).read_text()
    text = text.replace("{{BODY}}", (TEMPLATE_DIR / BODY).read_text())
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("{{") and stripped.endswith("}}") and not values.get(stripped[2:-2], "x"):
            continue  # an optional directive that is not set
        for key, val in values.items():
            line = line.replace("{{" + key + "}}", val)
        lines.append(line)
    script = "\n".join(lines) + "\n"
    leftover = re.findall(r"\{\{[A-Z_]+\}\}", script)
    if leftover:
        raise SubmitError(f"template {template_name(spec)} has unknown placeholders {sorted(set(leftover))}")
    script_path = log_dir / SCRIPT_NAME
    sbatch_argv = ["sbatch", "--parsable", f"--output={log_pattern}", f"--error={log_pattern}", f"--chdir={cwd}",
                   *spec.sbatch_args, str(script_path)]
    return Rendered(run_dir, script_path, script, log_pattern, sbatch_argv)


def submit(spec: SubmitSpec, dry_run: bool = False, cwd: Optional[Path] = None, stream=None) -> int:
    out = stream or sys.stdout
    r = render(spec, cwd)
    if dry_run:
        print(f"# {r.script_path} (not written: --dry-run)", file=out)
        print(r.script, file=out, end="")
        print(f"# submit with: {shlex.join(r.sbatch_argv)}", file=out)
        return 0
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found on PATH (is this a SLURM login node? scripts/slurm_cluster.sh starts a "
                          "local test cluster)")
    r.script_path.parent.mkdir(parents=True, exist_ok=True)
    r.script_path.write_text(r.script)
    r.script_path.chmod(0o755)
    proc = subprocess.run(r.sbatch_argv, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        print(proc.stderr.strip(), file=sys.stderr)
        raise SubmitError(f"sbatch failed with exit code {proc.returncode}")
    job_id = proc.stdout.strip().split(";")[0]
    with (r.run_dir / LOG_SUBDIR / "job_ids").open("a") as f:
        f.write(job_id + "\n")
    print(f"submitted job {job_id}", file=out)
    print(f"script:  {r.script_path}", file=out)
    print(f"log:     {str(r.log_pattern).replace('%j', job_id)}", file=out)
    print(f"results: {r.run_dir} (summary.json when done)", file=out)
    out.flush()
    return 0
