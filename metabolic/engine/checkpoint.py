"""Checkpoint and resume through DeepSpeed, with the run's own state in the client state.

DeepSpeed saves model, optimizer (each rank's partition) and LR state; the client state holds
the loop position, the data plan and scores, the controller (identical on every rank; DeepSpeed
writes it from rank 0 only). What differs by rank - the ledger's partial sums, its initial
weights for M_min (its own partition) and the RNG - goes in a file each rank writes itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from metabolic.engine.config import ConfigError

CHECKPOINTS = "checkpoints"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS


def holds_run(output_dir: Path) -> bool:
    """Whether output_dir already holds a run's records or checkpoints; a config error when it
    cannot be written (checked without creating anything)."""
    try:
        if (output_dir / "metrics.jsonl").exists() or checkpoint_root(output_dir).exists():
            return True
        parent = output_dir
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        problem = ("is not a folder" if not parent.is_dir()
                   else None if os.access(parent, os.W_OK | os.X_OK) else "is not writable")
    except OSError as err:  # e.g. a parent folder this user may not enter
        raise ConfigError(f"config key 'output_dir': cannot write '{output_dir}' ({err.strerror})") from err
    if problem:
        raise ConfigError(f"config key 'output_dir': cannot write '{output_dir}': '{parent}' {problem}")
    return False


def latest_tag(output_dir: Path) -> Optional[str]:
    """The tag DeepSpeed recorded as latest, if its folder exists."""
    latest = checkpoint_root(output_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (checkpoint_root(output_dir) / tag).is_dir() else None


def save(engine, output_dir: Path, step: int, client_state: dict, rank_state: dict, rank: int, keep: int = 2) -> str:
    """Save a checkpoint tagged by step (shared state in DeepSpeed's client state, this rank's own
    in rank_state_rank{rank}.pt); keep the newest `keep` checkpoints."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:09d}"
    latest = latest_tag(output_dir)
    if latest is not None and latest.split("_r")[0] == tag:
        # A second save at the same step (an epoch's last step, a stop on a checkpoint_every step):
        # a new folder, so a save that dies part-way never damages the one `latest` names.
        tag = f"{tag}_r{int(latest.split('_r')[1]) + 1 if '_r' in latest else 1}"
    if dist.is_initialized():
        dist.barrier()  # every rank has read `latest` before rank 0 can rewrite it
    # This rank's file first: DeepSpeed writes `latest` last, so a save that dies part-way leaves
    # `latest` on the previous, complete checkpoint.
    (root / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, root / tag / f"rank_state_rank{rank}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in tags[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    return tag


def load(engine, output_dir: Path, rank: int, world_size: int) -> tuple[Optional[dict], Optional[dict]]:
    """Load the latest checkpoint; returns (client_state, this rank's state) or (None, None)."""
    tag = latest_tag(output_dir)
    if tag is None:
        return None, None
    root = checkpoint_root(output_dir)
    # Checked before DeepSpeed reads anything: with another world size its ZeRO loader fails
    # obscurely, or waits in a collective the other ranks never enter.
    written = len(list((root / tag).glob("rank_state_rank*.pt")))
    if written != world_size:
        raise ConfigError(f"resume: checkpoint {root / tag} was written by {written} ranks, this run has "
                          f"{world_size} (dist/world_size must match)")
    _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    return client_state, torch.load(root / tag / f"rank_state_rank{rank}.pt", weights_only=True)
