"""End-to-end runs of the real CLI: outputs and metric contract, 2 gloo ranks, resume equality."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import (CONFIG, REPO, SMALL, comparable, env, free_port, metabolic, ok, records, stop_at_step, summary,
                     torchrun)

METRICS = {"step", "epoch", "train/loss", "energy/metabolic", "energy/metabolic_min", "energy/changed_weights",
           "energy/joules", "data/samples_forward", "data/samples_backward", "data/effective_epochs",
           "data/tokens", "compute/flops", "time/wall_s", "time/samples_per_s", "dist/world_size"}


def test_single_process_run_writes_contract(tmp_path, fmnist):
    out = tmp_path / "run"
    ok(metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=2", "train.eval_every=5"))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.png"):
        assert (out / name).is_file(), name
    recs = records(out)
    assert all(METRICS <= r.keys() for r in recs)
    # TensorBoard holds the same scalars as metrics.jsonl, at the same steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("energy/metabolic")] == [r["step"] for r in recs]
    assert [e.value for e in tb.Scalars("eval/accuracy")] == pytest.approx([r["eval/accuracy"] for r in recs
                                                                            if "eval/accuracy" in r])
    # eval_every=5 evaluates at steps 5, 10, 15, 20 and at each epoch's end (12, 24)
    evals = [r for r in recs if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [5, 10, 12, 15, 20, 24] and all(0 <= r["eval/accuracy"] <= 1 for r in evals)
    s = summary(out)
    assert s["energy/metabolic_ratio"] == pytest.approx(s["energy/metabolic"] / s["energy/metabolic_min"])
    steps_per_epoch = 384 // 32
    assert s["step"] == 2 * steps_per_epoch and s["dist/world_size"] == 1
    assert s["data/samples_backward"] == 2 * 384 and s["data/effective_epochs"] == pytest.approx(2.0)
    assert s["energy/metabolic"] >= s["energy/metabolic_min"] > 0
    # Dense AdamW moves (almost) every weight on every step.
    assert 0.99 * s["step"] * s["energy/num_weights"] <= s["energy/changed_weights"] <= s["step"] * s["energy/num_weights"]
    assert s["compute/flops"] == pytest.approx(3 * s["compute/forward_flops_per_sample"] * 768)
    # Records are cumulative: energy and samples never decrease.
    for a, b in zip(recs, recs[1:]):
        assert b["energy/metabolic"] >= a["energy/metabolic"] and b["data/samples_backward"] >= a["data/samples_backward"]
    # report and compare work on the finished run (compare against itself: every ratio is 1.00x).
    (out / "report.png").unlink()
    rep = ok(metabolic("report", str(out), timeout=120)).stdout
    assert "accuracy" in rep and f"{s['eval/accuracy']:.4g}" in rep and (out / "report.png").is_file()
    m_end = s["energy/metabolic"]
    cmp = ok(metabolic("compare", str(out), str(out), "--out", str(tmp_path / "cmp.png"),
                       "--at-energy", f"{m_end / 1e3},{m_end * 2}", timeout=120)).stdout
    assert cmp.count("(1.00x)") >= 16 and (tmp_path / "cmp.png").is_file()
    # accuracy at equal energy: nothing evaluated at a thousandth of the spend; the end beyond it
    table = cmp[cmp.index("eval/accuracy at M="):].splitlines()
    assert table[2].split() == [out.name, "-", f"{s['eval/accuracy']:.4g}"]
    bad = metabolic("compare", str(out), "--at-energy", "-5", timeout=60)
    assert bad.returncode == 2 and "--at-energy" in bad.stderr
    assert metabolic("report", str(tmp_path / "nothing"), timeout=60).returncode == 2
    # A second start in the same folder is refused and loses nothing.
    before = (out / "summary.json").read_text()
    proc = metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL)
    assert proc.returncode == 2 and "resume=true" in proc.stderr
    assert (out / "summary.json").read_text() == before


def test_progress_bar_total_tightens_under_sample_dropout(tmp_path, fmnist):
    # 384 samples / 32 = 12 steps per full epoch; pdd_random keeps 0.5^t of them from epoch 1
    out = tmp_path / "run"
    proc = ok(metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=3",
                        "train.progress=true", "data.policy=pdd_random", "data.gamma=0.5"))
    totals = [int(t) for t in re.findall(r"\d+/(\d+) \[", proc.stderr)]
    done, last = re.findall(r"(\d+)/(\d+) \[", proc.stderr)[-1]
    assert totals[0] == 36  # before any dropout: three full epochs
    assert int(done) == int(last) == summary(out)["step"] == 12 + 6 + 3


def test_dense_tail_updates_every_weight_in_the_last_part_of_the_run(tmp_path, fmnist):
    # A price no update can pay: no weight moves until the tail (the second of two epochs),
    # where every weight moves on every step, the first of them paying out the residual.
    out = tmp_path / "run"
    ok(metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=2",
                 "optimizer.name=masked_adamw", "optimizer.select=soft", "optimizer.price=1e6",
                 "optimizer.count_price=1e-6", "optimizer.residual=true", "optimizer.dense_tail=0.5"))
    recs = [r for r in records(out) if r["step"] > 0]
    n = summary(out)["energy/num_weights"]
    first, second = [r for r in recs if r["step"] <= 12], [r for r in recs if r["step"] > 12]
    assert len(first) >= 12 and len(second) >= 12
    assert all(r["energy/changed_weights"] == 0 for r in first)
    assert second[-1]["energy/changed_weights"] >= 0.99 * 12 * n


@pytest.mark.parametrize("overrides, what, kept_step", [
    # caught at the step-2 record, after step 1's checkpoint (weights huge but finite)
    (["optimizer.lr=1e30", "train.checkpoint_every=1"], "train/loss is nan", 1),
    # caught before the step-2 checkpoint, from the loss since the last record (step 0)
    (["optimizer.lr=1e30", "train.checkpoint_every=2", "train.log_every=5"], "train/loss is not finite", None),
    # step 1's loss is finite, the weights it leaves are not: its checkpoint is refused
    (["optimizer.weight_decay=1e42", "train.checkpoint_every=1"], "the weights are not finite", None),
])
def test_divergence_stops_the_run_and_keeps_no_diverged_checkpoint(tmp_path, fmnist, overrides, what, kept_step):
    out = tmp_path / "run"
    proc = metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.warmup_steps=0", *overrides)
    assert proc.returncode == 65, proc.stderr[-3000:]
    err = [l for l in proc.stderr.splitlines() if l.startswith("metabolic: error:")]
    assert len(err) == 1 and "diverged" in err[0] and what in err[0] and "optimizer.lr" in err[0], proc.stderr[-3000:]
    assert not (out / "summary.json").exists()
    recs = records(out) if (out / "metrics.jsonl").exists() else []  # no record before step 5 in one case
    assert all(math.isfinite(r["train/loss"]) for r in recs if r.get("train/loss") is not None)
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
    if kept_step is None:
        assert tags == [] and "no checkpoint was written" in err[0]
        return
    assert tags == [f"step_{kept_step:09d}"] and tags[0] in err[0]
    weights = torch.load(out / "checkpoints" / tags[0] / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point())


def test_divergence_stops_every_rank_under_zero2(tmp_path, fmnist):
    # the weights check reads each rank's flat ZeRO partition; both ranks stop at the same step
    out = tmp_path / "run"
    proc = torchrun(2, "-m", "metabolic", "train", str(CONFIG), f"output_dir={out}", *SMALL, "train.warmup_steps=0",
                    "deepspeed.zero_stage=2", "optimizer.weight_decay=1e42", "train.checkpoint_every=1")
    # counted in the whole stream: two ranks' lines may still interleave on a shared pipe
    head = "metabolic: error: training diverged by step 1 (epoch 0): the weights are not finite"
    assert proc.returncode != 0 and proc.stderr.count(head) == 2, proc.stderr[-4000:]
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


def test_ctrl_c_under_torchrun_checkpoints_every_rank(tmp_path, fmnist):
    # A terminal's Ctrl-C reaches torchrun, which forwards SIGINT to each rank (its own session).
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "metabolic", "train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for(out / "metrics.jsonl", 4, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to its foreground process group
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    # found in the whole stream: two ranks' lines may still interleave on a shared pipe
    stopped = re.findall(r"metabolic: stop signal at step \d+;", err)
    assert len(stopped) == 2 and stopped[0] == stopped[1], err[-4000:]
    step = records(out)[-1]["step"]
    assert f"step {step};" in stopped[0] and (out / "checkpoints" / f"step_{step:09d}").is_dir()
    assert len(list((out / "checkpoints" / f"step_{step:09d}").glob("rank_state_rank*.pt"))) == 2


def test_missing_dataset_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    proc = metabolic("train", str(CONFIG), f"output_dir={out}", f"data.path={tmp_path / 'nothing'}", *SMALL)
    assert proc.returncode == 2 and "dataset-fashion-mnist" in proc.stderr
    assert not out.exists()
    # an output_dir that cannot be written is refused before the data is loaded
    (tmp_path / "file").write_text("")
    proc = metabolic("train", str(CONFIG), f"output_dir={tmp_path / 'file' / 'run'}", f"data.path={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"config key 'output_dir': cannot write '{tmp_path / 'file' / 'run'}': '{tmp_path / 'file'}' is not a folder" \
        in proc.stderr


def test_two_ranks_zero1_equals_zero2(tmp_path, fmnist):
    runs = {}
    for stage in (1, 2):
        out = tmp_path / f"z{stage}"
        ok(torchrun(2, "-m", "metabolic", "train", str(CONFIG), f"output_dir={out}", *SMALL,
                    f"deepspeed.zero_stage={stage}", "train.epochs=1"))
        runs[stage] = summary(out)
    s1, s2 = runs[1], runs[2]
    assert s1["dist/world_size"] == 2 and s1["data/samples_backward"] == 384
    for key in ("energy/metabolic", "energy/metabolic_min", "eval/accuracy", "eval/loss"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-6, abs=1e-9), key
    assert s1["energy/changed_weights"] == s2["energy/changed_weights"]
    # Every rank trained on the same plan (hash of the active set is computed on each rank).
    assert s1["epochs"][0]["active_hash"] == s2["epochs"][0]["active_hash"]


def test_ledger_matches_full_weight_snapshots_under_zero(tmp_path, fmnist):
    """On 2 ranks and ZeRO 0-3 the globally reduced ledger equals sum |dw| of the full fp32 weights."""
    ok(torchrun(2, str(REPO / "tests" / "workers" / "ledger_zero_worker.py"), str(tmp_path), "0,1,2,3", "1.0",
                timeout=500))
    results = json.loads((tmp_path / "ledger_zero.json").read_text())
    assert results["0"]["replicated"] is True and results["2"]["replicated"] is False
    # Both sides sum fp32 differences in float32 (cascade / per-chunk partials), in different
    # orders: measured 4e-7 to 1.0e-6 apart; an average weight's change is 1.3e-5 of the total,
    # and the changed-weight counts must agree exactly.
    for stage, r in results.items():
        assert r["ledger"] == pytest.approx(r["snapshots"], rel=3e-6), stage
        assert r["ledger_changed"] == r["snapshots_changed"], stage
        assert r["ledger_min"] == pytest.approx(r["snapshots_min"], rel=1e-6), stage
        assert r["ledger"] >= r["ledger_min"] > 0


def _wait_for(path, n_lines: int, proc, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= n_lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("run did not reach the step to interrupt")


JOINT_BUDGET = ["optimizer.name=masked_adamw", "optimizer.select=soft", "data.policy=price",
                "energy.controller=true", "energy.budget=150", "energy.price=0.001",
                "energy.price_step=1.0", "energy.data_scale=100"]


@pytest.mark.parametrize("extra", [[], JOINT_BUDGET], ids=["dense", "joint_budget"])
def test_resume_after_preemption_equals_uninterrupted(tmp_path, fmnist, extra):
    """joint_budget: the controller's price and its pace (spend and progress at the last
    update) travel in the checkpoint, so the resumed run prices every step the same."""
    args = [*SMALL, "train.epochs=2", "train.checkpoint_every=5", *extra]
    full = tmp_path / "full"
    ok(metabolic("train", str(CONFIG), f"output_dir={full}", *args))

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "metabolic", "train", str(CONFIG), f"output_dir={cut}", *args],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(cut / "metrics.jsonl", 7, proc)  # mid-way through the first epoch (12 steps per epoch)
    proc.send_signal(signal.SIGINT)  # Ctrl-C; SLURM's SIGUSR1 is tested in test_data_service and test_slurm
    try:
        proc.wait(timeout=240)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 75 and "Ctrl-C" in err, err[-3000:]
    stopped_at = records(cut)[-1]["step"]
    assert 7 <= stopped_at < 24 and not (cut / "summary.json").exists()
    # a stopped run is reported from its last record, marked unfinished
    rep = ok(metabolic("report", str(cut), timeout=120)).stdout
    assert f"cut (unfinished, step {stopped_at})" in rep and "bwd samples" in rep
    assert re.search(r"^0\s+1\s", rep, re.M), rep  # epoch 0's row of the per-epoch table: every sample kept

    ok(metabolic("train", str(CONFIG), f"output_dir={cut}", *args, "resume=true"))
    assert comparable(summary(cut)) == comparable(summary(full))
    assert [r["step"] for r in records(cut)] == [r["step"] for r in records(full)]


def test_two_saves_at_one_step_keep_the_first_and_resume_from_the_second(tmp_path, fmnist):
    # checkpoint_every fires on each epoch's last step, and the epoch-end save follows at the same
    # step: it goes to a new folder, never over the checkpoint `latest` names.
    out = tmp_path / "run"
    args = [*SMALL, "train.checkpoint_every=12"]  # 12 steps per epoch
    ok(metabolic("train", str(CONFIG), f"output_dir={out}", *args, "train.epochs=2"))
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000000024", "step_000000024_r1"]
    assert (root / "latest").read_text().strip() == "step_000000024_r1"
    first = comparable(summary(out))
    proc = ok(metabolic("train", str(CONFIG), f"output_dir={out}", *args, "train.epochs=2", "resume=true"))
    assert "resumed from step 24 (epoch 2)" in proc.stderr and comparable(summary(out)) == first


def test_resume_without_checkpoint_sets_earlier_records_aside(tmp_path, fmnist):
    out = tmp_path / "run"
    out.mkdir()
    stale = '{"step": 999, "epoch": 0}\n'
    (out / "metrics.jsonl").write_text(stale)  # an attempt that died before its first checkpoint
    proc = ok(metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=1", "resume=true"))
    aside = list(out.glob("metrics.no_checkpoint.*.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == stale and aside[0].name in proc.stderr
    assert all(r["step"] <= 12 for r in records(out)) and summary(out)["step"] == 12


def test_resume_that_does_not_match_the_checkpoint_is_a_config_error(tmp_path, fmnist):
    out = tmp_path / "run"
    ok(metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=1"))
    before = {name: (out / name).read_text() for name in ("metrics.jsonl", "config.yaml")}
    proc = torchrun(2, "-m", "metabolic", "train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=2",
                    "resume=true")
    assert proc.returncode != 0
    assert "metabolic: error: resume: checkpoint" in proc.stderr and "written by 1 ranks, this run has 2" in proc.stderr
    for change, key in (("data.limit=256", "data.limit"), ("energy.alpha=0.5", "energy.alpha")):
        proc = metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=1", change, "resume=true")
        lines = [l for l in proc.stderr.splitlines() if l.startswith("metabolic: error:")]
        assert proc.returncode == 2 and len(lines) == 1 and f"'{key}'" in lines[0], proc.stderr[-2000:]
    assert {name: (out / name).read_text() for name in before} == before  # nothing written is lost


def test_a_finished_run_restores_the_signal_handlers(tmp_path, fmnist):
    # In-process sweeps (benchmarks/science.py) build one Trainer after another: a finished one
    # must not keep catching Ctrl-C.
    code = f"""
import signal, sys
from metabolic.engine.config import load_config
from metabolic.engine.distributed import init_distributed
from metabolic.engine.trainer import Trainer
cfg = load_config({str(CONFIG)!r}, {[*SMALL, "train.epochs=1", f"output_dir={tmp_path / 'run'}"]!r})
before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]
Trainer(cfg, init_distributed()).run()
after = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]
print("restored" if after == before else f"changed: {{before}} -> {{after}}")
"""
    proc = ok(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                             timeout=300))
    assert proc.stdout.strip().splitlines()[-1] == "restored", proc.stdout[-2000:]


def test_sigterm_stops_with_a_checkpoint_that_resumes(tmp_path, fmnist):
    # what a scheduler or `kill` sends before it ends a job
    out = tmp_path / "run"
    args = [str(CONFIG), *SMALL, "train.epochs=2"]
    stop_at_step(args, out, 3, sig=signal.SIGTERM)
    step = records(out)[-1]["step"]
    assert 3 <= step < 24 and (out / "checkpoints" / f"step_{step:09d}").is_dir()
    proc = ok(metabolic("train", *args, f"output_dir={out}", "resume=true"))
    assert f"resumed from step {step}" in proc.stderr and summary(out)["step"] == 24


def test_a_second_ctrl_c_quits_and_an_echo_of_the_first_does_not(monkeypatch):
    # A launcher may deliver one Ctrl-C twice within moments: that is still the first. A Ctrl-C
    # more than SECOND_CTRL_C_S later quits at once (KeyboardInterrupt, no checkpoint).
    from metabolic.engine import trainer

    t = trainer.Trainer.__new__(trainer.Trainer)  # the handler's own state only
    t._first_sigint, t._stop_requested, t.is_main = None, False, False
    now = [100.0]
    monkeypatch.setattr(trainer.time, "monotonic", lambda: now[0])
    t._on_signal(signal.SIGINT, None)
    assert t._stop_requested
    now[0] += 0.5 * trainer.SECOND_CTRL_C_S
    t._on_signal(signal.SIGINT, None)  # the echo: no exception
    now[0] += trainer.SECOND_CTRL_C_S
    with pytest.raises(KeyboardInterrupt):
        t._on_signal(signal.SIGINT, None)


@pytest.mark.parametrize("extra", [["model.name=mlp", "model.width=32"], ["model.name=resnet18", "model.width=8"],
                                   ["optimizer.name=masked_sgd", "optimizer.lr=0.05", "optimizer.select=topk",
                                    "optimizer.fraction=0.1"]], ids=["mlp", "resnet18", "masked_sgd_topk"])
def test_other_models_and_masked_sgd_train(tmp_path, fmnist, extra):
    out = tmp_path / "run"
    ok(metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=1", *extra))
    s = summary(out)
    assert s["step"] == 12 and 0 <= s["eval/accuracy"] <= 1 and s["energy/metabolic"] >= s["energy/metabolic_min"] > 0
    losses = [r["train/loss"] for r in records(out) if r.get("train/loss") is not None]
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # it learns
    if "optimizer.select=topk" in extra:  # a tenth of the weights change per step
        assert 0.08 < s["energy/changed_weights"] / (s["step"] * s["energy/num_weights"]) < 0.12
