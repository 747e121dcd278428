"""`metabolic launch`: build and run the `accelerate launch` command for one node of a job.

The command is an argv list (never shell text): accelerate starts `procs_per_node` ranks of
`python -m metabolic train CONFIG [overrides]` on this node. DeepSpeed is the engine on every
machine, so the launch always goes through accelerate's DeepSpeed launcher with the experiment's
own DeepSpeed config (written to `<output_dir>/deepspeed.json`); with several nodes the ranks
meet through a c10d rendezvous at `--main-address:--main-port`, hosted by node rank 0. On CPU
machines the trainer picks gloo itself (metabolic.engine.distributed), so the same argv serves
CPU and GPU nodes. (`accelerate launch --cpu --num_processes 2` would start ONE process:
PLATFORM.md.)
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ACCELERATE = "accelerate.commands.launch"  # run as `python -m accelerate.commands.launch`: no PATH lookup
DS_CONFIG_NAME = "deepspeed.json"


class LaunchError(ValueError):
    """A launch request that cannot work (bad node counts, contradicting accelerate config)."""


@dataclass
class LaunchSpec:
    """One node's share of a job."""

    config: str
    overrides: list[str]
    nodes: int = 1
    procs_per_node: int = 1
    main_address: Optional[str] = None
    main_port: Optional[int] = None
    node_rank: int = 0
    accelerate_config: Optional[str] = None
    python: str = sys.executable

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def default_procs_per_node() -> int:
    """One rank per GPU; one rank on a machine without CUDA."""
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except Exception:  # pragma: no cover - torch is a dependency
        return 1


def check_spec(spec: LaunchSpec) -> None:
    if spec.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {spec.nodes}")
    if spec.procs_per_node < 1:
        raise LaunchError(f"--procs-per-node must be >= 1, got {spec.procs_per_node}")
    if not 0 <= spec.node_rank < spec.nodes:
        raise LaunchError(f"--node-rank must be in [0, {spec.nodes - 1}], got {spec.node_rank}")
    if spec.nodes > 1 and not spec.main_address:
        raise LaunchError("--main-address (the address of node rank 0) is required with --nodes > 1")
    if spec.main_port is not None and not 0 <= spec.main_port < 65536:
        raise LaunchError(f"--main-port must be a TCP port, got {spec.main_port}")


def read_accelerate_config(path: str) -> dict:
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:
        raise LaunchError(f"--accelerate-config {path}: cannot read it ({err})") from err
    if not isinstance(data, dict):
        raise LaunchError(f"--accelerate-config {path}: expected a mapping of accelerate settings")
    return data


def defaults_from_accelerate_config(path: str) -> dict:
    """nodes / procs_per_node / main_address / main_port / node_rank that an accelerate config file sets."""
    data = read_accelerate_config(path)
    out = {}
    machines, procs = data.get("num_machines"), data.get("num_processes")
    if machines:
        out["nodes"] = int(machines)
    if procs:
        out["procs_per_node"] = max(int(procs) // int(machines or 1), 1)
    if data.get("main_process_ip"):
        out["main_address"] = str(data["main_process_ip"])
    if data.get("main_process_port") is not None:
        out["main_port"] = int(data["main_process_port"])
    if data.get("machine_rank") is not None:
        out["node_rank"] = int(data["machine_rank"])
    return out


def _accelerate_zero_stage(path: str) -> Optional[int]:
    """The ZeRO stage an accelerate config file names (None when it names none)."""
    data = read_accelerate_config(path)
    stage = data.get("deepspeed_config", {}) or {}
    stage = stage.get("zero_stage") if isinstance(stage, dict) else None
    return None if stage is None else int(stage)


def load_experiment(config: str, overrides: Sequence[str]):
    """The validated experiment (raises metabolic.engine.config.ConfigError, exit 2 in the CLI)."""
    from metabolic.engine.config import load_config

    return load_config(config, list(overrides))


def check_against_accelerate_config(cfg, spec: LaunchSpec) -> None:
    if not spec.accelerate_config:
        return
    stage = _accelerate_zero_stage(spec.accelerate_config)
    if stage is not None and stage != cfg.deepspeed.zero_stage:
        raise LaunchError(f"--accelerate-config {spec.accelerate_config} says ZeRO stage {stage} but the experiment "
                          f"has deepspeed.zero_stage={cfg.deepspeed.zero_stage}; pass deepspeed.zero_stage={stage} "
                          "(the trainer builds its DeepSpeed engine from the experiment)")


def ds_config_path(cfg) -> Path:
    return Path(cfg.output_dir).absolute() / DS_CONFIG_NAME


def write_ds_config(cfg, world_size: int) -> Path:
    """The experiment's DeepSpeed config for accelerate, written atomically (every node writes the same)."""
    from metabolic.engine.build import deepspeed_config

    path = ds_config_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(deepspeed_config(cfg, world_size), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def build_argv(spec: LaunchSpec, cfg) -> list[str]:
    """The exact `accelerate launch` argv for this node (an argv list: nothing is shell-parsed)."""
    check_spec(spec)
    argv = [spec.python, "-m", ACCELERATE]
    if spec.accelerate_config:
        argv += ["--config_file", str(spec.accelerate_config)]  # explicit flags below override it
    argv += ["--use_deepspeed", "--deepspeed_config_file", str(ds_config_path(cfg)),
             "--deepspeed_multinode_launcher", "standard",
             "--mixed_precision", "bf16" if cfg.train.bf16 else "no",
             "--dynamo_backend", "no",
             "--num_processes", str(spec.world_size),
             "--num_machines", str(spec.nodes),
             "--machine_rank", str(spec.node_rank)]
    if spec.nodes > 1:
        # c10d rendezvous at the head node; node rank 0 hosts its store (explicit, so two "nodes"
        # sharing one host, as in the test cluster, cannot both claim it).
        argv += ["--rdzv_backend", "c10d", "--main_process_ip", str(spec.main_address),
                 "--main_process_port", str(spec.main_port if spec.main_port is not None else 29500),
                 "--rdzv_conf", f"is_host={1 if spec.node_rank == 0 else 0}"]
    else:
        if spec.main_address:
            argv += ["--main_process_ip", str(spec.main_address)]
        argv += ["--main_process_port", str(spec.main_port if spec.main_port is not None else 0)]  # 0: a free port
    argv += ["--module", "metabolic", "train", str(spec.config), *spec.overrides]
    return argv


def launch_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "metabolic" / "torch_extensions"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def format_argv(argv: Sequence[str]) -> str:
    """The argv as one line a POSIX shell runs unchanged (each word shlex-quoted)."""
    return shlex.join(argv)


def run(spec: LaunchSpec, dry_run: bool = False, stream=None) -> int:
    """Validate, print (dry run) or exec the accelerate launcher. Returns only for a dry run or on errors."""
    cfg = load_experiment(spec.config, spec.overrides)
    check_against_accelerate_config(cfg, spec)
    argv = build_argv(spec, cfg)
    if dry_run:
        print(format_argv(argv), file=stream or sys.stdout)
        return 0
    write_ds_config(cfg, spec.world_size)
    print(f"[metabolic] launch: {format_argv(argv)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # exec: the launcher takes this process's place, so signals and exit codes are accelerate's own.
    os.execve(argv[0], argv, launch_env())
    return 1  # pragma: no cover
