"""Process-group setup that works under any launcher (torchrun, deepspeed, accelerate, srun) or none."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    """This process has no GPU of its own: more processes on the node than visible GPUs."""


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    meta_group: object  # gloo group for metadata (scores, flags, ledger) so GPU streams stay untouched
    setup_group: object = None  # gloo group with SETUP_TIMEOUT, for waiting on rank 0's one-off data preparation


SETUP_TIMEOUT = timedelta(hours=24)
"""How long ranks wait for rank 0 to train a tokenizer or tokenize a corpus: hours for a large
corpus, where the collectives' own timeout (10 minutes by default) would fail the run. A rank
that dies still fails the others at once (its connections close)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _from_slurm_env() -> None:
    """Map SLURM's task variables to torch's when srun starts the ranks directly."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if int(os.environ["SLURM_NTASKS"]) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(timeout_s: Optional[float] = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed; a lone process becomes a world of one.
    timeout_s: how long a collective may wait for the other ranks (None: DeepSpeed's default)."""
    import deepspeed

    _from_slurm_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():  # else set_device fails with "invalid device ordinal"
            raise DeviceError(f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()} "
                              "CUDA device(s); start at most that many processes per node (metabolic launch "
                              "--procs-per-node, torchrun --nproc_per_node) or make more visible in "
                              "CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    # DeepSpeed's default (10 minutes, or DEEPSPEED_TIMEOUT) for every group, the metadata one included.
    timeout = timedelta(minutes=int(os.getenv("DEEPSPEED_TIMEOUT", "10"))) if timeout_s is None else timedelta(
        seconds=timeout_s)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    meta = dist.new_group(backend="gloo", timeout=timeout)
    setup = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, meta, setup)


def share_from_rank0(obj, group=None):
    """Rank 0's `obj` on every rank (the others wait for it); a lone process gets its own back."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather_objects(obj, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def rank_setup(info: DistInfo, should_stop=lambda: False):
    """This rank's RankSetup: rank 0's one-off data preparation waits in the setup group."""
    from metabolic.engine.rank_setup import RankSetup

    group = info.setup_group or info.meta_group
    return RankSetup(info.rank == 0, lambda obj: share_from_rank0(obj, group), lambda obj: gather_objects(obj, group),
                     should_stop)


def shutdown_distributed() -> None:
    """barrier + destroy_process_group: avoids gloo's abort at exit seen with torch 2.13 (PLATFORM.md)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
