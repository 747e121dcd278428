"""Data-service benchmark: its overhead per training step, and epoch planning for a large table.

    python benchmarks/data_service.py [--steps 60] [--sizes 1000000,10000000] [--layout-sizes 10000000] [--json]

1. Overhead at 2 ranks (real gloo processes started with torchrun): the default CNN experiment
   (configs/fmnist_cnn.yaml, full Fashion-MNIST table) trains `--steps` optimizer steps; per step
   we time the whole step, the service's share of it (record() of the micro-batch scores and the
   int64 all-gather in sync(), timed after a barrier so that waiting for a slower rank, which the
   gradient all-reduce would pay anyway, is not charged to the service), and planning one epoch
   amortised over the epoch's steps, for each policy (medians over the steps). Refresh forwards are not counted as overhead here: they are model compute,
   reported in data/samples_forward and compute/flops.
2. Planning time (median of 3 after an untimed one) for synthetic tables of `--sizes` samples (policy + sha1 of the active set +
   shuffle and this rank's shard at 2 ranks, micro-batch 128), with the table's memory.
3. In the 2-rank worker, planning for synthetic tables of `--layout-sizes` samples with the
   replicated table and with the owner-sharded one (each rank holds half the rows, and counts,
   subsets and shards go through gloo collectives), with the ratio sharded / replicated.

Timings are never asserted in tests; targets: overhead < 2% of step time, 10 M planning < 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
POLICY_ARGS = {
    "full": {}, "pdd_difficulty": {"tau": 0.5}, "pdd_random": {"gamma": 0.5}, "pdd_matched": {"tau": 0.5},
    "infobatch": {"prune_ratio": 0.5, "anneal": 0.875}, "price": {"price": 0.1},
}


def _populated_service(n: int, policy_name: str, world: int, rank: int, micro: int, layout: str = "replicated",
                       group=None):
    from omegaconf import OmegaConf

    from metabolic.engine.config import DataConfig
    from metabolic.engine.data_service import DataService
    from metabolic.engine.policies import build_policy

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig),
                                              {"policy": policy_name, **POLICY_ARGS[policy_name]}))
    svc = DataService(n, build_policy(cfg), seed=0, micro_batch=micro, grad_accum=1, rank=rank, world_size=world,
                      group=group, score_table=layout)
    g = torch.Generator().manual_seed(rank if layout == "sharded" else 0)  # replicas: the same rows
    t = svc.table
    rows = t.loss.numel()  # every row with the replicated table, this rank's own with the sharded one
    t.loss.copy_(torch.rand(rows, generator=g) * 2)
    t.prob.copy_(torch.exp(-t.loss))
    t.correct.copy_(t.prob > 0.5)
    t.epoch.fill_(2)
    t.level.copy_(1.0 + torch.rand(rows, generator=g))
    t.level_now = 1.0
    return svc


def timed_plan(svc, epoch: int, num_epochs: int, repeats: int):
    """(plan, median wall s, median CPU s) of planning `epoch` afresh `repeats` times, after one
    untimed plan (first-call costs: allocator growth, lazy imports)."""
    plan = svc.plan_epoch(epoch, num_epochs)
    walls, cpus = [], []
    for _ in range(repeats):
        svc._current = None  # plan_epoch returns a planned epoch's plan as is: force a new one
        t0, c0 = time.perf_counter(), time.process_time()
        plan = svc.plan_epoch(epoch, num_epochs)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return plan, statistics.median(walls), statistics.median(cpus)


def planning(sizes: list[int], policies: list[str], threads: int = 1, repeats: int = 3) -> list[dict]:
    """Median wall and CPU seconds of plan_epoch on one thread (CPU time is robust on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    for n in sizes:
        for name in policies:
            svc = _populated_service(n, name, world=2, rank=0, micro=128)
            plan, dt, dc = timed_plan(svc, 3, 10, repeats)
            rows.append({"samples": n, "policy": name, "plan_s": dt, "plan_cpu_s": dc,
                         "kept_fraction": plan.kept_fraction, "table_MiB": svc.table.nbytes / 2**20})
            del svc, plan
    torch.set_num_threads(before)
    return rows


# -- 2-rank overhead worker -----------------------------------------------------------------------
def worker(out: Path, steps: int, policies: list[str], layout_sizes: list[int]) -> None:
    from metabolic.engine.config import load_config
    from metabolic.engine.data_service import DataService
    from metabolic.engine.distributed import init_distributed, shutdown_distributed
    from metabolic.engine.policies import build_policy
    from metabolic.engine.trainer import Trainer

    info = init_distributed()
    results = []
    for name in policies:
        cfg = load_config(REPO / "configs" / "fmnist_cnn.yaml",
                          [f"output_dir={out}/run_{name}", "train.progress=false", "energy.joules=false",
                           f"data.policy={name}", *[f"data.{k}={v}" for k, v in POLICY_ARGS[name].items()]])
        trainer = Trainer(cfg, info)
        svc: DataService = trainer.service
        # A realistic table (every sample scored) so the policy has work to do when planning.
        populated = _populated_service(svc.table.loss.numel(), name, info.world_size, info.rank,
                                       cfg.train.micro_batch_size)
        svc.table = populated.table
        svc.policy = build_policy(cfg.data)
        plan, plan_s, _ = timed_plan(svc, 3, cfg.train.epochs, repeats=3)
        steps_per_epoch = max(plan.num_micro_batches // cfg.train.grad_accum, 1)
        record_s = [0.0]
        original = svc.record

        def timed_record(*a, **k):
            s = time.perf_counter()
            original(*a, **k)
            record_s[0] += time.perf_counter() - s

        svc.record = timed_record
        step_s, sync_s, rec = [], [], []
        for m in range(steps + 5):  # a short plan wraps round: every policy times `steps` steps
            record_s[0] = 0.0
            s = time.perf_counter()
            trainer._train_micro_batch(plan, m % plan.num_micro_batches)
            if info.world_size > 1:  # rank skew is the model's, not the service's: absorb it outside the sync
                torch.distributed.barrier(group=info.meta_group)
            s1 = time.perf_counter()
            svc.sync()
            s2 = time.perf_counter()
            if m >= 5:  # warm-up steps excluded
                step_s.append(s2 - s)
                sync_s.append(s2 - s1)
                rec.append(record_s[0])
        step, sync, record = (statistics.median(v) for v in (step_s, sync_s, rec))  # a noisy machine
        amortised_plan = plan_s / steps_per_epoch
        results.append({"policy": name, "step_ms": 1e3 * step, "record_ms": 1e3 * record, "sync_ms": 1e3 * sync,
                        "plan_ms": 1e3 * plan_s, "steps_per_epoch": steps_per_epoch,
                        "overhead_pct": 100 * (record + sync + amortised_plan) / step, "timed_steps": len(step_s)})
        trainer.metrics.close()
        if info.rank == 0:  # after every policy: a later failure keeps what was measured
            (out / "overhead.json").write_text(json.dumps(results))
    layouts = []
    for n in layout_sizes:  # the same synthetic tables planned with either layout, in this process
        for name in policies:
            row = {"samples": n, "policy": name}
            for layout in ("replicated", "sharded"):
                svc = _populated_service(n, name, info.world_size, info.rank, 128, layout, info.meta_group)
                plan, wall, _ = timed_plan(svc, 3, 10, repeats=3)
                row[layout] = {"plan_s": wall, "table_MiB": svc.table.nbytes / 2**20,
                               "kept_fraction": plan.kept_fraction}
                del svc, plan
            row["ratio"] = row["sharded"]["plan_s"] / row["replicated"]["plan_s"]
            layouts.append(row)
            if info.rank == 0:
                (out / "layouts.json").write_text(json.dumps(layouts))
    shutdown_distributed()


def overhead(steps: int, policies: list[str], layout_sizes: list[int],
             timeout: float) -> tuple[list[dict], list[dict], str | None]:
    """Rows of the 2-rank worker (overhead, then layouts), and what went wrong if it did not finish
    (its rows so far stand)."""
    with tempfile.TemporaryDirectory(prefix="ds_bench_") as d:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "metabolic" / "torch_extensions"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(Path(__file__).resolve()), "--worker", d, "--steps", str(steps),
               "--policies", ",".join(policies), "--layout-sizes", ",".join(map(str, layout_sizes))]
        error = None
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
            if proc.returncode != 0:
                error = f"2-rank worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        except subprocess.TimeoutExpired:
            error = f"2-rank worker did not finish in --timeout {timeout:g} s"
        rows = [json.loads(p.read_text()) if p.is_file() else [] for p in (Path(d) / "overhead.json",
                                                                           Path(d) / "layouts.json")]
        return rows[0], rows[1], error


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="timed optimizer steps per policy at 2 ranks")
    ap.add_argument("--sizes", default="1000000,10000000", help="table sizes for the planning benchmark")
    ap.add_argument("--policies", default=",".join(POLICY_ARGS))
    ap.add_argument("--layout-sizes", default="10000000",
                    help="table sizes planned with the replicated and the sharded table at 2 ranks ('' for none)")
    ap.add_argument("--skip-overhead", action="store_true", help="planning benchmark only (no 2-rank worker)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    policies = args.policies.split(",")
    layout_sizes = [int(s) for s in args.layout_sizes.split(",") if s]
    if args.worker:
        worker(Path(args.worker), args.steps, policies, layout_sizes)
        return
    result = {"torch": torch.__version__, "planning": planning(
        [int(s) for s in args.sizes.split(",") if s], policies)}
    if not args.skip_overhead:
        result["overhead"], result["layouts"], error = overhead(args.steps, policies, layout_sizes, args.timeout)
        if error:
            result["overhead_error"] = error
    if args.json:
        print(json.dumps(result, indent=2))
        sys.exit(1 if result.get("overhead_error") else 0)
    print(f"Planning one epoch (policy + active-set hash + shuffle + shard at 2 ranks), torch {torch.__version__}, "
          "1 thread")
    print(f"{'samples':>11} {'policy':>15} {'wall s':>8} {'cpu s':>8} {'kept':>6} {'table MiB':>10}")
    for r in result["planning"]:
        print(f"{r['samples']:>11,} {r['policy']:>15} {r['plan_s']:>8.3f} {r['plan_cpu_s']:>8.3f} "
              f"{r['kept_fraction']:>6.2f} {r['table_MiB']:>10.1f}")
    if "overhead" in result:
        print("\nService overhead per optimizer step, default CNN (configs/fmnist_cnn.yaml), 2 gloo ranks")
        print(f"{'policy':>15} {'step ms':>8} {'record ms':>9} {'sync ms':>8} {'plan ms':>8} {'steps/ep':>8} "
              f"{'overhead %':>10}")
        for r in result["overhead"]:
            print(f"{r['policy']:>15} {r['step_ms']:>8.1f} {r['record_ms']:>9.3f} {r['sync_ms']:>8.3f} "
                  f"{r['plan_ms']:>8.1f} {r['steps_per_epoch']:>8} {r['overhead_pct']:>10.2f}")
    if result.get("layouts"):
        print("\nPlanning one epoch at 2 gloo ranks, replicated table against owner-sharded (rank 0's wall s,"
              " table MiB per rank)")
        print(f"{'samples':>11} {'policy':>15} {'repl. s':>8} {'shard. s':>8} {'ratio':>6} {'repl. MiB':>10} "
              f"{'shard. MiB':>10} {'kept':>6}")
        for r in result["layouts"]:
            rep, sh = r["replicated"], r["sharded"]
            print(f"{r['samples']:>11,} {r['policy']:>15} {rep['plan_s']:>8.3f} {sh['plan_s']:>8.3f} "
                  f"{r['ratio']:>6.2f} {rep['table_MiB']:>10.1f} {sh['table_MiB']:>10.1f} {sh['kept_fraction']:>6.2f}")
    if result.get("overhead_error"):
        print(f"\noverhead benchmark incomplete: {result['overhead_error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
