"""torchrun worker: MaskedAdamW as DeepSpeed's client optimizer under ZeRO stages 0-3.

Usage: python -m torch.distributed.run --nproc_per_node 2 masked_zero_worker.py OUT.json

For each rule and each stage (one process group, engines re-created per stage) it trains a
2-layer MLP for a few steps and records per step the global metabolic energy (stage 0 without
bf16: each rank holds the full replica, so rank 0's value; stages 1-3: all_reduce sum of the
partitions) and the global changed count. Rank 0 also trains the same model in a single process
on the whole global batch (the reference) and writes everything to OUT.json.
"""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from metabolic.engine.build import masked_param_groups
from metabolic.kernels import MaskedAdamW

STEPS = 3
MICRO = 4
CLIP = 1.0  # DeepSpeed clips client-optimizer grads to norm 1.0 unless told; do it on both sides
RULES = {"soft": dict(select="soft", price=0.05), "topk": dict(select="topk", fraction=0.1),
         # two param groups (optimizer.dense_1d): soft with a count price and a residual on the
         # matrices, dense on the biases
         "soft_groups": dict(select="soft", price=0.05, count_price=1e-4, residual=True)}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(MICRO * world, 16, generator=gen), torch.randint(0, 4, (MICRO * world,), generator=gen)


def make_opt(params, rule: str) -> MaskedAdamW:
    return MaskedAdamW(masked_param_groups(params, dense_1d=rule == "soft_groups"), lr=1e-2,
                       weight_decay=0.01, **RULES[rule])


def single_process(rule: str, world: int) -> list[dict]:
    net = model()
    opt = make_opt(net.parameters(), rule)
    out = []
    for step in range(STEPS):
        x, y = batch(step, world)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        out.append({"metabolic": opt.last_energy["metabolic"], "changed": opt.last_energy["changed"],
                    "numel": opt.last_energy["numel"]})
    return out


def zero_run(rule: str, stage: int, rank: int, world: int) -> list[dict]:
    net = model()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": CLIP,
              "steps_per_print": 10**9}
    engine, opt, _, _ = deepspeed.initialize(model=net, optimizer=make_opt(net.parameters(), rule),
                                             config=config)
    masked = opt if isinstance(opt, MaskedAdamW) else opt.optimizer
    # ZeRO 1-3 call step() once per param group (the others swapped out), so last_energy holds
    # only the last group's share; sum every call, as the engine's ledger does with its hooks
    step_total = torch.zeros(3, dtype=torch.float64)

    def add(optimizer, args, kwargs):
        le = optimizer.last_energy
        step_total.add_(torch.tensor([le["metabolic"], le["changed"], le["numel"]], dtype=torch.float64))

    masked.register_step_post_hook(add)
    out = []
    for step in range(STEPS):
        x, y = batch(step, world)
        sl = slice(rank * MICRO, (rank + 1) * MICRO)
        loss = torch.nn.functional.cross_entropy(engine(x[sl]), y[sl])
        step_total.zero_()
        engine.backward(loss)
        engine.step()
        t = step_total.clone()
        if stage > 0:
            dist.all_reduce(t)  # partitions: the rank totals add up
        else:
            dist.broadcast(t, 0)  # replicas: every rank holds the full update; count it once
        out.append({"metabolic": t[0].item(), "changed": int(t[1].item()), "numel": int(t[2].item())})
    del engine, opt
    return out


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for rule in RULES:
        results[rule] = {"single": single_process(rule, world) if rank == 0 else None}
        for stage in (0, 1, 2, 3):
            results[rule][f"stage{stage}"] = zero_run(rule, stage, rank, world)
            dist.barrier()
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
