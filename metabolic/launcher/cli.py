"""The `metabolic` command line: train (and, as they land, launch, submit, report, compare)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

EXIT_CONFIG = 2


def _error(msg: str, code: int = EXIT_CONFIG) -> int:
    print(f"metabolic: error: {msg}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from metabolic.engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _error(str(err))
    from metabolic.data.idx import DatasetMissingError
    from metabolic.engine.trainer import PREEMPTED_EXIT_CODE, Preempted, train

    try:
        summary = train(cfg)
    except ConfigError as err:
        return _error(str(err))
    except DatasetMissingError as err:
        return _error(str(err))
    except Preempted as err:
        print(f"metabolic: {err}; run again with resume=true", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if summary and not args.quiet:
        keys = ("step", "eval/accuracy", "eval/loss", "eval/perplexity", "energy/metabolic", "energy/metabolic_min",
                "energy/changed_weights", "data/effective_epochs", "time/wall_s")
        import torch.distributed  # noqa: F401  (rank is known only through the env once the group is gone)
        import os

        if os.environ.get("RANK", "0") == "0":
            print(" ".join(f"{k}={summary[k]:.6g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                           for k in keys if summary.get(k) is not None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metabolic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one experiment in this process (works under any launcher)")
    p.add_argument("config", help="experiment YAML (e.g. configs/fmnist_cnn.yaml)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, key=value")
    p.add_argument("--quiet", action="store_true", help="do not print the final summary line")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
