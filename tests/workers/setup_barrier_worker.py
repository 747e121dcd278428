"""Multi-rank worker: rank 0's one-off data preparation may outlast the collectives' timeout.

Usage: torchrun --nproc_per_node 2 setup_barrier_worker.py
The process groups come up with a 2-second collective timeout. Rank 0 then works for 5 s (as
it does while it trains a tokenizer or tokenizes a corpus) while rank 1 waits in the setup
group's barrier, which must hold; the same wait in the training (meta) group must fail, which
shows the short timeout is in force. Each rank prints one line per barrier.
"""

import os
import sys
import time

import torch.distributed as dist

from metabolic.engine.distributed import init_distributed

info = init_distributed(timeout_s=2)
for name, group in (("setup", info.setup_group), ("meta", info.meta_group)):
    if info.rank == 0:
        time.sleep(5)
    start = time.monotonic()
    try:
        dist.barrier(group=group)
        print(f"rank {info.rank} {name} barrier passed after {time.monotonic() - start:.1f} s", flush=True)
    except Exception as err:  # noqa: BLE001 - the timeout's type differs between torch versions
        print(f"rank {info.rank} {name} barrier failed after {time.monotonic() - start:.1f} s: "
              f"{type(err).__name__}", flush=True)
sys.stdout.flush()
os._exit(0)  # a group that timed out cannot be torn down cleanly
