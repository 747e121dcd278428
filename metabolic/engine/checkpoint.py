"""Checkpoint and resume through DeepSpeed, with the run's own state in the client state.

DeepSpeed saves model, optimizer (each rank's partition) and LR state; the client state holds
the loop position, the ledger and the data service (identical on every rank, written once).
Each rank's initial weights (for M_min) are its own partition, so each rank writes its file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

CHECKPOINTS = "checkpoints"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS


def latest_tag(output_dir: Path) -> Optional[str]:
    """The tag DeepSpeed recorded as latest, if its folder exists."""
    latest = checkpoint_root(output_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (checkpoint_root(output_dir) / tag).is_dir() else None


def save(engine, output_dir: Path, step: int, client_state: dict, initial_weights: list[torch.Tensor],
         rank: int, keep: int = 2) -> str:
    """Save a checkpoint tagged by step; keep the newest `keep` checkpoints."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:09d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    torch.save(initial_weights, root / tag / f"initial_weights_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in tags[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    return tag


def load(engine, output_dir: Path, rank: int) -> tuple[Optional[dict], Optional[list[torch.Tensor]]]:
    """Load the latest checkpoint; returns (client_state, this rank's initial weights) or (None, None)."""
    tag = latest_tag(output_dir)
    if tag is None:
        return None, None
    root = checkpoint_root(output_dir)
    _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    init_path = root / tag / f"initial_weights_rank{rank}.pt"
    if not init_path.is_file():
        raise FileNotFoundError(f"checkpoint {root / tag} has no {init_path.name}: resume with the same world size")
    return client_state, torch.load(init_path, weights_only=True)
