"""2-rank worker: the ledger under each ZeRO stage against full fp32 weight snapshots.

Usage: torchrun --nproc_per_node 2 ledger_zero_worker.py OUT_DIR STAGES ALPHA
Writes OUT_DIR/ledger_zero.json from rank 0: per stage, the ledger's global figures and the
figures computed here from deepspeed's safe_get_full_fp32_param snapshots.
"""

import json
import signal
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import CONFIG, SMALL  # noqa: E402

from metabolic.engine.config import load_config  # noqa: E402
from metabolic.engine.distributed import init_distributed, shutdown_distributed  # noqa: E402
from metabolic.engine.ledger import energy_of  # noqa: E402
from metabolic.engine.trainer import STOP_SIGNALS, Trainer  # noqa: E402


def full_weights(params) -> list[torch.Tensor]:
    out = []
    for p in params:
        w = safe_get_full_fp32_param(p)  # collective under ZeRO; None for plain parameters
        out.append((w if w is not None else p).detach().float().clone())
    return out


def main() -> None:
    out, stages, alpha = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], float(sys.argv[3])
    info = init_distributed()
    results = {}
    for stage in stages:
        cfg = load_config(CONFIG, SMALL + [f"output_dir={out}/z{stage}", f"deepspeed.zero_stage={stage}",
                                           f"energy.alpha={alpha}"])
        before = [signal.getsignal(sig) for sig in STOP_SIGNALS]
        trainer = Trainer(cfg, info)
        # A Trainer that is built but not run leaves no stop handlers behind (they would swallow
        # SIGTERM and keep every earlier Trainer alive through their bound methods).
        assert [signal.getsignal(sig) for sig in STOP_SIGNALS] == before, "a built Trainer kept its signal handlers"
        plan = trainer.service.plan_epoch(0, 1)
        params = list(trainer.engine.module.parameters())
        w0 = full_weights(params)
        expected = changed = 0.0
        for m in range(4):
            before = full_weights(params)
            trainer._train_micro_batch(plan, m)
            after = full_weights(params)
            for a, b in zip(after, before):
                expected += float(energy_of(a - b, alpha))
                changed += float(((a - b) != 0).sum())
        got = trainer.ledger.reduce()
        m_min = sum(float(energy_of(a - b, alpha)) for a, b in zip(full_weights(params), w0))
        results[stage] = {"ledger": got["energy/metabolic"], "snapshots": expected,
                          "ledger_changed": got["energy/changed_weights"], "snapshots_changed": changed,
                          "ledger_min": got["energy/metabolic_min"], "snapshots_min": m_min,
                          "replicated": trainer.ledger.replicated}
    if info.rank == 0:
        (out / "ledger_zero.json").write_text(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":
    main()
