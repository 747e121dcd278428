"""Tokens/s of the metabolic trainer against a minimal plain DeepSpeed loop, same process.

Both train the same model (built by the same code, same seed) with torch AdamW, the same
DeepSpeed config (ZeRO stage, bf16, micro batch) and the same packed sequences. The trainer
runs its whole loop: data service, per-sample losses, energy ledger, score sync, stop-flag
agreement and logging. The plain loop is forward, mean loss, backward, step. Runs alternate
(plain, metabolic, plain, metabolic, ...) and the table reports medians; the ratio is
metabolic / plain tokens/s (target >= 0.95).

    python benchmarks/lm_throughput.py                      # lm_tiny on CPU
    python benchmarks/lm_throughput.py --json --steps 40 train.log_every=20 model.depth=2
    torchrun --nproc_per_node 2 benchmarks/lm_throughput.py deepspeed.zero_stage=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def plain_deepspeed(cfg, info, task, steps: int, warmup: int) -> float:
    """Tokens/s of the minimal loop over the first (warmup + steps) micro-batches of each rank."""
    import deepspeed

    from metabolic.engine import build

    torch.manual_seed(cfg.seed)
    ds_config = build.deepspeed_config(cfg, info.world_size)
    model, keep_alive = build.build_model(cfg, task, ds_config)
    o = cfg.optimizer  # the same AdamW hyperparameters as the trainer's optimizer.name=adamw
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    mb = cfg.train.micro_batch_size
    n = task.num_train
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(info)
            t0 = time.perf_counter()
        start = ((step * info.world_size + info.rank) * mb) % max(n - mb, 1)
        ids = task.train[torch.arange(start, start + mb)].to(info.device)
        logits = engine(ids)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    _sync(info)
    elapsed = time.perf_counter() - t0
    del engine, keep_alive
    return steps * mb * task.seq_len * info.world_size / elapsed


def metabolic_trainer(cfg, info, steps: int, warmup: int) -> float:
    """Tokens/s of Trainer.run between the records at step `warmup` and step `warmup + steps`."""
    from metabolic.engine.metrics import read_jsonl
    from metabolic.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if info.world_size > 1:  # every rank must write to the same folder
            obj = [str(out)]
            torch.distributed.broadcast_object_list(obj, src=0, group=info.meta_group)
            out = Path(obj[0])
        cfg.output_dir = str(out)
        cfg.train.max_steps = warmup + steps
        # Records at `warmup` and `warmup + steps` bound the timed window; logging in between runs at
        # the experiment's own interval (main() checks both are multiples of it), as in real training.
        cfg.train.progress = False
        Trainer(cfg, info).run()
        _sync(info)
        recs = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")} if info.rank == 0 else {}
        obj = [recs]
        if info.world_size > 1:
            torch.distributed.broadcast_object_list(obj, src=0, group=info.meta_group)
        recs = obj[0]
        a, b = recs[warmup], recs[warmup + steps]
        return (b["data/tokens"] - a["data/tokens"]) / (b["time/wall_s"] - a["time/wall_s"])


def _sync(info) -> None:
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    if info.world_size > 1:
        torch.distributed.barrier(group=info.meta_group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "lm_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps per run (default 2 x train.log_every; a multiple of it)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before timing (default train.log_every; a multiple of it)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of each loop (odd, so the median is one run's figure)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args()

    from metabolic.engine import build
    from metabolic.engine.config import load_config
    from metabolic.engine.distributed import init_distributed, rank_setup, shutdown_distributed

    info = init_distributed()
    base = load_config(args.config, list(args.overrides) + ["data.policy=full", "optimizer.name=adamw"])
    every = base.train.log_every
    args.warmup = every if args.warmup is None else args.warmup
    args.steps = 2 * every if args.steps is None else args.steps
    # checked before anything is measured: a bad flag must not cost a whole plain run first
    if args.warmup < every or args.steps < every or args.warmup % every or args.steps % every:
        raise SystemExit(f"--warmup and --steps must be positive multiples of train.log_every={every} "
                         f"(the trainer's records bound the timed window), got {args.warmup} and {args.steps}")
    if args.repeats < 1 or args.repeats % 2 == 0:
        raise SystemExit(f"--repeats must be odd and >= 1, got {args.repeats}")
    with tempfile.TemporaryDirectory() as tok_dir:  # rank 0's folder: the tokenizer and token file are shared
        setup = rank_setup(info)
        task = build.build_task(base, info.device, Path(setup.share(tok_dir)), setup)
        need = (args.warmup + args.steps + 1) * base.train.micro_batch_size * info.world_size
        if task.num_train < need:
            raise SystemExit(f"corpus has {task.num_train} sequences; the benchmark needs {need}")
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(plain_deepspeed(base, info, task, args.steps, args.warmup))
            ours.append(metabolic_trainer(load_config(args.config, list(args.overrides)), info, args.steps, args.warmup))
    p, m = statistics.median(plain), statistics.median(ours)
    result = {"config": Path(args.config).name, "overrides": args.overrides, "device": str(info.device),
              "world_size": info.world_size, "zero_stage": base.deepspeed.zero_stage, "bf16": base.train.bf16,
              "params": build.count_params(build.build_model(base, task, {})[0]) if base.deepspeed.zero_stage < 3 else None,
              "tokens_per_step": base.train.micro_batch_size * task.seq_len * info.world_size,
              "plain_deepspeed_tokens_per_s": p, "metabolic_tokens_per_s": m, "ratio": m / p,
              "runs": {"plain": plain, "metabolic": ours}}
    if info.rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{'loop':<18}{'tokens/s (median)':>20}{'runs':>40}")
            print(f"{'plain DeepSpeed':<18}{p:>20.1f}{str([round(x) for x in plain]):>40}")
            print(f"{'metabolic':<18}{m:>20.1f}{str([round(x) for x in ours]):>40}")
            print(f"ratio metabolic/plain = {m / p:.3f}  (device {info.device}, world {info.world_size}, "
                  f"ZeRO {base.deepspeed.zero_stage}, {result['tokens_per_step']} tokens/step)")
    shutdown_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
