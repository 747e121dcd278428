"""The `metabolic` command line: train, launch (accelerate, multi-node), submit (SLURM), config, report, compare."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import Optional

EXIT_CONFIG = 2


def _say(line: str) -> None:
    """One line to stderr in one write: ranks share stderr under torchrun, and print's separate
    newline let two ranks' messages run together on one line."""
    sys.stderr.write(f"metabolic: {line}\n")
    sys.stderr.flush()


def _error(msg: str, code: int = EXIT_CONFIG) -> int:
    _say(f"error: {msg}")
    return code


def cmd_train(args: argparse.Namespace) -> int:
    return _leave(_train(args))


def _leave(code: int) -> int:
    """A rank of a multi-process run leaves with os._exit once everything is written and the
    process group is destroyed: torch 2.13's gloo can still abort in its C++ teardown after a
    clean run (`terminate called without an active exception`, PLATFORM.md), which turns a
    finished run into a failed launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(args: argparse.Namespace) -> int:
    from metabolic.engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _error(str(err))
    from metabolic.data.idx import DatasetMissingError
    from metabolic.data.file_cache import Interrupted
    from metabolic.engine.distributed import DeviceError
    from metabolic.engine.trainer import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, Diverged, Preempted, train

    try:
        summary = train(cfg)
    except (ConfigError, DatasetMissingError, DeviceError) as err:
        return _error(str(err))
    except (Preempted, Interrupted) as err:  # Interrupted: stopped while preparing the data, before any checkpoint
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: a Ctrl-C's echo must not turn 75 into a crash
        _say(f"{err}; run again with resume=true")
        return PREEMPTED_EXIT_CODE
    except Diverged as err:
        return _error(str(err), DIVERGED_EXIT_CODE)
    if summary and not args.quiet:
        keys = ("step", "eval/accuracy", "eval/loss", "eval/perplexity", "energy/metabolic", "energy/metabolic_min",
                "energy/changed_weights", "data/effective_epochs", "time/wall_s")
        # The process group is gone by now; the launcher's RANK says which process prints.
        if os.environ.get("RANK", "0") == "0":
            print(" ".join(f"{k}={summary[k]:.6g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                           for k in keys if summary.get(k) is not None))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from metabolic.engine.config import ConfigError
    from metabolic.launcher.launch import (LaunchError, LaunchSpec, default_procs_per_node,
                                           defaults_from_accelerate_config, run)

    try:
        # Unset flags come from --accelerate-config (when given), then from the defaults.
        file_values = defaults_from_accelerate_config(args.accelerate_config) if args.accelerate_config else {}
        # `is None`, not `or`: an explicit 0 must reach LaunchSpec's check, not become the default
        nodes = args.nodes if args.nodes is not None else file_values.get("nodes", 1)
        node_rank = args.node_rank
        if node_rank is None:
            node_rank = int(os.environ["SLURM_NODEID"]) if nodes > 1 and "SLURM_NODEID" in os.environ \
                else file_values.get("node_rank", 0)
        spec = LaunchSpec(args.config, list(args.overrides), nodes=nodes,
                          procs_per_node=args.procs_per_node if args.procs_per_node is not None
                          else file_values.get("procs_per_node") or default_procs_per_node(),
                          main_address=args.main_address or file_values.get("main_address"),
                          main_port=args.main_port if args.main_port is not None else file_values.get("main_port"),
                          node_rank=node_rank, accelerate_config=args.accelerate_config)
        return run(spec, dry_run=args.dry_run)
    except (ConfigError, LaunchError) as err:
        return _error(str(err))


def cmd_submit(args: argparse.Namespace) -> int:
    from metabolic.engine.config import ConfigError
    from metabolic.launcher.launch import LaunchError
    from metabolic.launcher.submit import SubmitError, SubmitSpec, submit

    spec = SubmitSpec(args.config, list(args.overrides), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      procs_per_node=args.procs_per_node, cpus_per_node=args.cpus_per_node,
                      partition=args.partition, time=args.time, signal_seconds=args.signal_seconds,
                      accelerate_config=args.accelerate_config, sbatch_args=list(args.sbatch_arg or []))
    try:
        return submit(spec, dry_run=args.dry_run)
    except (ConfigError, LaunchError, SubmitError) as err:
        return _error(str(err))


def cmd_config(args: argparse.Namespace) -> int:
    from metabolic.engine.config import ConfigError, explain, load_config

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not os.path.exists(path):  # only overrides, no file
        path, overrides = None, [path, *overrides]
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        return _error(str(err))
    print(explain(cfg), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from metabolic.engine.report import RunMissingError, report

    try:
        print(report(args.run_dir))
    except (RunMissingError, ValueError) as err:
        return _error(str(err))
    return 0


def _energy_levels(text: str) -> list[float]:
    """--at-energy: comma-separated positive numbers."""
    try:
        levels = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--at-energy takes numbers like 2000,8000, got {text!r}") from None
    if not levels or any(not (v > 0 and math.isfinite(v)) for v in levels):
        raise argparse.ArgumentTypeError(f"--at-energy levels must be finite and > 0, got {text!r}")
    return levels


def cmd_compare(args: argparse.Namespace) -> int:
    from metabolic.engine.report import RunMissingError, compare

    try:
        print(compare(args.run_dirs, out=args.out, at_energy=args.at_energy))
    except (RunMissingError, ValueError) as err:
        return _error(str(err))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metabolic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one experiment in this process (works under any launcher)")
    p.add_argument("config", help="experiment YAML (e.g. configs/fmnist_cnn.yaml)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, key=value")
    p.add_argument("--quiet", action="store_true", help="do not print the final summary line")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="run `accelerate launch` for this node (single node, or one node of several)",
                       description="Build and run the `accelerate launch` command that starts this node's ranks of "
                                   "`metabolic train` (DeepSpeed config from the experiment, written to "
                                   "<output_dir>/deepspeed.json; c10d rendezvous with several nodes).")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, key=value")
    p.add_argument("--nodes", type=int, default=None, help="number of machines in the job (default 1)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="ranks on each machine (default: one per GPU, 1 without CUDA)")
    p.add_argument("--main-address", default=None, help="address of node rank 0 (required with --nodes > 1)")
    p.add_argument("--main-port", type=int, default=None,
                   help="rendezvous port on node rank 0 (default 29500 multi-node, a free port on one node)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this machine's rank, 0..nodes-1 (default $SLURM_NODEID with several nodes, else 0)")
    p.add_argument("--accelerate-config", default=None,
                   help="an accelerate config file (configs/accelerate/*.yaml) for defaults; flags win")
    p.add_argument("--dry-run", action="store_true", help="print the exact argv and exit")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("submit", help="render an sbatch script into the run folder and submit it",
                       description="Render slurm/<cpu|gpu>_<single|multi>_node.sbatch to <output_dir>/slurm/job.sbatch "
                                   "and submit it with sbatch. The job resumes from its checkpoint when requeued.")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, key=value")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (one SLURM task per node)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU job; default 0)")
    p.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-node", type=int, default=None, help="CPUs per node (default: ranks per node)")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", default=None, help="time limit (e.g. 30, 01:00:00, 1-00:00:00)")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="SLURM sends USR1 this long before the time limit: checkpoint, requeue (default 120)")
    p.add_argument("--accelerate-config", default=None, help="an accelerate config file passed to every node's launch")
    p.add_argument("--sbatch-arg", action="append", metavar="ARG",
                   help="extra sbatch argument, e.g. --sbatch-arg=--account=proj (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; submit nothing")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("config", help="print the resolved, validated config with every key's meaning",
                       description="Load CONFIG (or the defaults) with the overrides, validate it as `train` would, "
                                   "and print it as YAML with each key's one-line docstring as a comment.")
    p.add_argument("config", nargs="?", default=None, help="experiment YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, key=value")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("report", help="print a finished run's figures and write its plots (report.png)")
    p.add_argument("run_dir", help="a run's output_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="several runs side by side, each figure's ratio to the first (baseline)")
    p.add_argument("run_dirs", nargs="+", help="run folders; the first is the baseline")
    p.add_argument("--out", default=None, help="plot path (default: compare.png beside the first run)")
    p.add_argument("--at-energy", type=_energy_levels, default=None, metavar="M[,M...]",
                   help="also each run's eval metric when it had spent these energy/metabolic levels")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
