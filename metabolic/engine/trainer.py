"""The training loop on DeepSpeed: one config in, a run folder out.

Read `Trainer.run` top to bottom: plan an epoch with the data service, train its micro-batches
(per-sample losses times the policy's weights), and after each optimizer step account energy,
log, evaluate, checkpoint and check for preemption.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from metabolic.engine import build, checkpoint
from metabolic.engine.controller import build_controller
from metabolic.engine.config import ConfigError, ExperimentConfig, to_dict, to_yaml
from metabolic.engine.data_service import DataService, EpochPlan, epoch_generator
from metabolic.engine.distributed import DistInfo, init_distributed, rank_setup, shutdown_distributed
from metabolic.engine.evaluate import evaluate, frozen_running_stats, restore_buffers, sync_buffers
from metabolic.engine.joules import JouleMeter
from metabolic.engine.ledger import EnergyLedger
from metabolic.engine.metrics import MetricsWriter, Progress, truncate_after
from metabolic.engine.policies import build_policy

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # SLURM's preemption notice, kill, Ctrl-C
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint saved, run again with resume=true
SECOND_CTRL_C_S = 1.0  # a Ctrl-C this long after the first quits without a checkpoint
DIVERGED_EXIT_CODE = 65  # EX_DATAERR: the loss or the weights stopped being finite


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written and the run can resume."""


class Diverged(Exception):
    """The training loss or the weights stopped being finite; no checkpoint holds them."""


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0
    micro: int = 0  # next micro-batch of the epoch's plan
    step: int = 0  # optimizer steps taken
    done: bool = False


class Trainer:
    """Builds a run from an ExperimentConfig and trains it."""

    def __init__(self, cfg: ExperimentConfig, dist_info: Optional[DistInfo] = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.info = dist_info or init_distributed(cfg.train.collective_timeout_s)
        self.is_main = self.info.rank == 0
        self._stop_requested = False
        self._first_sigint: Optional[float] = None  # monotonic time of the first Ctrl-C
        # Stop signals are caught while the run is built (preparing an LM corpus may take hours; it
        # polls the flag) and again in run(): a stop during the build takes effect at the first step.
        self._catch_signals()
        try:
            self._build(cfg)
        finally:
            self._restore_signals()

    def _build(self, cfg: ExperimentConfig) -> None:
        import deepspeed

        torch.manual_seed(cfg.seed)
        self._check_output_dir()
        self.task = build.build_task(cfg, self.info.device, self.out,
                                     rank_setup(self.info, lambda: self._stop_requested))

        ds_config = build.deepspeed_config(cfg, self.info.world_size)
        model, self._hf_ds_config = build.build_model(cfg, self.task, ds_config)
        self.flops_per_sample = build.forward_flops_per_sample(cfg, model, self.task)
        self.num_params = build.count_params(model)
        self.optimizer = build.build_optimizer(cfg, model.parameters())
        self._selection = build.selection_of(self.optimizer)  # the configured rule, per group
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        meter = JouleMeter(self.info.local_rank if self.info.device.type == "cuda" and cfg.energy.joules else None,
                           read_cpu=cfg.energy.joules and self.info.local_rank == 0)
        self.ledger = EnergyLedger(cfg.energy.alpha, self.num_params, self.info.rank, self.info.world_size,
                                   self.info.meta_group, meter if meter.available else None)
        self.ledger.attach(self.optimizer)
        self.service = DataService(self.task.num_train, build_policy(cfg.data), cfg.seed, cfg.train.micro_batch_size,
                                   cfg.train.grad_accum, self.info.rank, self.info.world_size, self.info.meta_group,
                                   relative_scores=cfg.data.relative_scores, score_table=cfg.data.score_table)
        self.controller = build_controller(cfg, self.optimizer, self.service.policy, self.is_main)
        self.state = LoopState()
        self.metrics = MetricsWriter(self.out, enabled=self.is_main)
        self.history: list[dict] = []  # per-epoch plan figures
        self._last: dict = {}

    # -- setup -----------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        # Now, not after minutes of loading data; without writing anything (a bad dataset path
        # must leave no empty run folder behind).
        if checkpoint.holds_run(self.out) and not self.cfg.resume:
            raise ConfigError(f"config key 'output_dir': '{self.out}' already holds a run; pass resume=true to "
                              "continue it or choose another output_dir")

    def _start(self) -> None:
        """Catch stop signals, restore a checkpoint when resuming, write config.yaml."""
        self._catch_signals()
        if self.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"config key 'output_dir': cannot create '{self.out}' ({err.strerror})") from err
        if self.cfg.resume:
            self._restore()  # first: a refused resume must leave the run's config.yaml as it was
        elif self.is_main:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.is_main:
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
        self.ledger.start_clock()

    def _restore(self) -> None:
        client, own = checkpoint.load(self.engine, self.out, self.info.rank, self.info.world_size)
        if client is None:
            if self.is_main:
                self._set_aside_records()
            return
        self.state = LoopState(**client["loop"])
        self.ledger.load_state_dict(own["ledger"])  # this rank's partial sums and wall clock
        self.ledger.load_initial_weights(own["initial_weights"])
        self.service.load_state_dict(client["service"], own.get("service"))
        restore_buffers(self.engine.module, own.get("buffers"))
        if self.controller is not None and client.get("controller"):
            self.controller.load_state_dict(client["controller"])
        self.history = client["history"]
        self._last = client["last"]
        torch.set_rng_state(own["rng"])
        if own.get("cuda_rng") is not None and self.info.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], self.info.device)  # dropout masks, as uninterrupted
        if self.is_main:
            truncate_after(self.out / "metrics.jsonl", self.state.step)
            print(f"[metabolic] resumed from step {self.state.step} (epoch {self.state.epoch})", file=sys.stderr)

    def _set_aside_records(self) -> None:
        """resume=true found no checkpoint: the run starts over, and the records of the attempt that
        wrote none are moved aside (not deleted, not mixed into the new run's curves)."""
        old = self.out / "metrics.jsonl"
        note = ""
        if old.exists():
            aside = self.out / f"metrics.no_checkpoint.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            old.rename(aside)
            note = f"; the earlier records are in {aside.name}"
        print(f"[metabolic] resume=true but no checkpoint in {self.out}; starting fresh{note}", file=sys.stderr)

    def _on_signal(self, signum, frame) -> None:
        """Stop at the next step with a checkpoint; a second Ctrl-C quits at once, without one.

        A launcher that forwards Ctrl-C to ranks in the terminal's process group delivers it twice
        within moments; only a Ctrl-C that comes a while after the first counts as the second."""
        now = time.monotonic()
        if signum == signal.SIGINT and self._first_sigint is not None and now - self._first_sigint > SECOND_CTRL_C_S:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self._first_sigint is None:
            self._first_sigint = now
        if self._stop_requested:
            return
        self._stop_requested = True
        if signum == signal.SIGINT and self.is_main:
            print("\n[metabolic] Ctrl-C: stopping at the next step with a checkpoint (Ctrl-C again: quit without one)",
                  file=sys.stderr)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the configured length; returns the summary (also written to summary.json)."""
        cfg = self.cfg
        progress = None
        try:
            self._start()
            progress = Progress(self.is_main and cfg.train.progress, self.state.step)
            while not self.state.done:
                if self.controller is not None and self.state.micro == 0:  # price this epoch's plan
                    self.controller.begin_epoch(self.service.table, self.optimizer, self.info.meta_group)
                plan = self.service.plan_epoch(self.state.epoch, cfg.train.epochs, scorer=self._score_no_grad,
                                               refresh_batch=max(256, 2 * cfg.train.micro_batch_size))
                if plan.refreshed:  # no-grad forwards that refreshed stale scores before this epoch
                    self.ledger.add_samples(forward=plan.refreshed, tokens=0,
                                            flops=self.flops_per_sample * plan.refreshed)
                if self.state.micro == 0:
                    plan = self._reprice_empty(plan)
                    self._record_plan(plan)
                progress.set_total(self._expected_steps(plan))
                self._train_epoch(plan, progress)
            summary = self._finish()
        finally:
            if progress is not None:
                progress.close()
            self.metrics.close()
            self._restore_signals()
        return summary

    def _catch_signals(self) -> None:
        self._old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _restore_signals(self) -> None:
        """Put back the handlers from before this Trainer, so a later one is not haunted."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def _reprice_empty(self, plan: EpochPlan) -> EpochPlan:
        """An epoch plan that keeps no sample, with budget left, is re-priced and planned again."""
        c = self.controller
        for _ in range(c.reprice_limit if c is not None else 0):
            if plan.num_active > 0 or not c.reprice_empty_plan(self._agree()[1]):
                break
            plan = self.service.replan(self.state.epoch, self.cfg.train.epochs)
        return plan

    def _train_epoch(self, plan: EpochPlan, progress: Progress) -> None:
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        for m in range(self.state.micro, plan.num_micro_batches):
            self._train_micro_batch(plan, m)
            if (m + 1) % accum:
                continue
            self.state.step += 1
            self.state.micro = m + 1
            self.service.sync()
            progress.update(1, epoch=self.state.epoch)
            if self._after_step(plan):
                return
        # Agree again at the epoch's end: an epoch whose plan kept no sample takes no step, and
        # would otherwise never see a stop signal nor let the controller bring the price down.
        stop, spent = self._agree()
        if self.controller is not None:
            idle_steps = self._full_epoch_steps() if plan.num_micro_batches == 0 else 0
            self.controller.update(spent, self._progress(plan, plan.num_micro_batches), idle_steps=idle_steps)
        self.state.epoch += 1
        self.state.micro = 0
        self.state.done = self.state.epoch >= cfg.train.epochs
        self._log(eval_now=True)
        self._checkpoint()
        if stop and not self.state.done:
            raise Preempted(f"stop signal at the end of epoch {self.state.epoch - 1}; checkpoint saved in "
                            f"{checkpoint.checkpoint_root(self.out)}")

    def _train_micro_batch(self, plan: EpochPlan, m: int) -> None:
        idx, weights = plan.batches[m], plan.weights[m].to(self.info.device)
        x, y = self.task.train_batch(idx, epoch_generator(self.cfg.seed, plan.epoch, salt=1000 + m))
        if m % self.cfg.train.grad_accum == 0:
            self._set_schedule(plan, m)
        x, y, weights, trained, seen = self._screen(plan, idx, x, y, weights)
        scores = self.task.score(self.engine(x), y)
        # Divided by the planned batch: screened-out samples count as zero loss, not as absent.
        loss = (scores.loss * weights).sum() / idx.numel()
        self.engine.backward(loss)
        self.engine.step()
        n, k = idx.numel(), trained.numel()
        screened = n if seen is not None else 0
        self.ledger.add_samples(forward=screened + k, backward=k, tokens=self.task.tokens(trained),
                                flops=self.flops_per_sample * (screened + 3.0 * k))
        scored = seen if seen is not None else scores  # the screen scored every planned sample
        self.ledger.add_loss(scored.loss.detach().sum(), n)
        self.service.record(idx, scored.loss, scored.prob, scored.correct, plan.epoch)

    def _screen(self, plan: EpochPlan, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
        """data.screen: score the planned micro-batch at the current weights (train mode, so with the
        batch's own normalisation statistics, as the training forward sees it) and keep the samples
        the policy's rule keeps now. Returns (x, y, weights, indices) to train on and the scores, or
        the batch unchanged and None when nothing is screened."""
        rule = self.service.policy.screen_rule(plan.epoch, self.cfg.train.epochs) if self.cfg.data.screen else None
        if rule is None:
            return x, y, weights, idx, None
        with torch.no_grad(), frozen_running_stats(self.engine.module):
            seen = self.task.score(self.engine(x), y)
        keep = rule(seen.prob, seen.correct)
        if not bool(keep.any()):  # ranks step in lockstep: train on the batch's hardest sample
            keep[seen.prob.argmin()] = True
        return x[keep], y[keep], weights[keep], idx[keep.cpu()], seen

    @torch.no_grad()
    def _score_no_grad(self, idx: torch.Tensor):
        """Score samples without training on them (the data service's refresh pass), in eval mode."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        x, y = self.task.train_batch(idx, epoch_generator(self.cfg.seed, self.state.epoch, salt=999))
        scores = self.task.score(self.engine(x), y)
        module.train(was_training)
        return scores

    def _full_epoch_steps(self) -> int:
        """Optimizer steps of an epoch that keeps every sample."""
        t = self.cfg.train
        return -(-len(self.service.table) // (t.micro_batch_size * t.grad_accum * self.info.world_size))

    def _expected_steps(self, plan: EpochPlan) -> int:
        """Optimizer steps of the whole run if later epochs keep every sample: exact with full
        data, an upper bound under sample dropout that tightens as each epoch is planned."""
        t = self.cfg.train
        full = self._full_epoch_steps()
        this_epoch = (plan.num_micro_batches - self.state.micro) // t.grad_accum
        total = self.state.step + this_epoch + (t.epochs - plan.epoch - 1) * full
        return min(total, t.max_steps) if t.max_steps else total

    def _progress(self, plan: EpochPlan, m: int) -> float:
        """Fraction of the run done in [0, 1]: by nominal epochs, or by steps against max_steps."""
        t = self.cfg.train
        n = plan.num_micro_batches
        progress = (plan.epoch + (m / n if n else 1.0)) / t.epochs  # an empty epoch is done at once
        if t.max_steps:
            progress = max(progress, self.state.step / t.max_steps)
        return progress

    def _set_schedule(self, plan: EpochPlan, m: int) -> None:
        """The step's learning rate, and dense updates in optimizer.dense_tail's final stretch."""
        progress = self._progress(plan, m)
        lr = build.learning_rate(self.cfg, self.state.step, progress)
        tail = self.cfg.optimizer.dense_tail > 0 and progress >= 1.0 - self.cfg.optimizer.dense_tail
        for group, selection in zip(self.optimizer.param_groups, self._selection):
            group["lr"] = lr
            # set both ways every step: a checkpoint's param_groups may hold either
            group.update(build.DENSE_SELECTION if tail and selection else selection)

    def _after_step(self, plan: EpochPlan) -> bool:
        """Log, evaluate, checkpoint, stop; True when the epoch must end early."""
        t, step = self.cfg.train, self.state.step
        stop, spent = self._agree()
        if self.controller is not None:
            self.controller.update(spent, self._progress(plan, self.state.micro))
        hit_max = t.max_steps is not None and step >= t.max_steps
        if hit_max:
            self.state.done = True
        eval_now = hit_max or (t.eval_every > 0 and step % t.eval_every == 0)
        if hit_max or eval_now or step % t.log_every == 0:
            self._log(eval_now=eval_now)
        saved = hit_max or (t.checkpoint_every > 0 and step % t.checkpoint_every == 0)
        if saved:
            self._checkpoint()
        if stop:
            if not saved:
                self._checkpoint()
            raise Preempted(f"stop signal at step {step}; checkpoint saved in {checkpoint.checkpoint_root(self.out)}")
        return hit_max

    def _agree(self) -> tuple[bool, float]:
        """One small all_reduce per step: whether any rank got a stop signal (every rank must stop at
        the same step, or one would hang in a collective) and the global energy spent so far (the
        controller's price must be the same on every rank)."""
        # The spend is read (a host sync on GPUs) only when a controller needs it.
        spent = float(self.ledger.local["metabolic"]) if self.controller is not None else 0.0
        vec = torch.tensor([1.0 if self._stop_requested else 0.0, spent], dtype=torch.float64)
        if self.info.world_size > 1:
            dist.all_reduce(vec, group=self.info.meta_group)
        return bool(vec[0] > 0), float(vec[1])

    # -- outputs ----------------------------------------------------------------------------------
    def _record_plan(self, plan: EpochPlan) -> None:
        self.history.append({"epoch": plan.epoch, "kept_fraction": plan.kept_fraction,
                             "num_active": plan.num_active, "active_hash": plan.active_hash,
                             "micro_batches_per_rank": plan.num_micro_batches})

    def _log(self, eval_now: bool) -> dict:
        record = {"step": self.state.step, "epoch": self.state.epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        record.update(self.ledger.reduce())
        if record["train/loss"] is not None and not math.isfinite(record["train/loss"]):
            self._diverged(f"train/loss is {record['train/loss']}")
        record["data/effective_epochs"] = record["data/samples_backward"] / self.task.num_train
        record.update(throughput(record, self._last, self.info.world_size, self.info.device))
        record["dist/world_size"] = self.info.world_size
        if self.history:  # the data plan of the epoch these steps trained on
            record["data/kept_fraction"] = self.history[-1]["kept_fraction"]
            record["data/active_hash"] = self.history[-1]["active_hash"]
            record["data/plan_epoch"] = self.history[-1]["epoch"]
        if self.controller is not None:
            record["energy/price"] = self.controller.price
            record["energy/data_threshold"] = self.controller.data_threshold
        if eval_now:
            sync_buffers(self.engine.module, self.info.world_size, self.info.meta_group)
            eval_batch = self.cfg.train.eval_batch_size or 2 * self.cfg.train.micro_batch_size
            record.update(evaluate(self.engine, self.task, eval_batch, self.info.rank, self.info.world_size,
                                   self.info.meta_group))
        self._last = {k: record[k] for k in ("time/wall_s", "data/samples_backward", "data/tokens", "compute/flops")}
        self._last["record"] = record
        self.metrics.write(record)
        return record

    def _checkpoint(self) -> None:
        self._check_finite()
        # The checkpoint holds the averaged running stats; training goes on with this rank's own, as
        # if no checkpoint were taken (they are in this rank's file for a resume).
        before = sync_buffers(self.engine.module, self.info.world_size, self.info.meta_group)
        client = {"loop": asdict(self.state), "service": self.service.state_dict(),
                  "controller": self.controller.state_dict() if self.controller else None,
                  "history": self.history, "last": self._last,
                  "config": to_dict(self.cfg)}
        own = {"ledger": self.ledger.state_dict(), "initial_weights": self.ledger.initial_weights(),
               "service": self.service.rank_state_dict(), "buffers": before,
               "rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state(self.info.device) if self.info.device.type == "cuda" else None}
        checkpoint.save(self.engine, self.out, self.state.step, client, own, self.info.rank)
        restore_buffers(self.engine.module, before)

    def _check_finite(self) -> None:
        """Before a checkpoint: the loss since the last record and this rank's weights (its ZeRO
        partition: the client optimizer's params) are finite on every rank, so no checkpoint ever
        holds a diverged model. One pass over the weights, only when a checkpoint is written."""
        pending = float(self.ledger.local["loss_sum"])
        # max |w| per tensor (no full-size temporary; nan propagates), one host sync for all
        norms = [torch.linalg.vector_norm(p.detach(), ord=math.inf).float().reshape(1)
                 for g in self.optimizer.param_groups for p in g["params"] if p.numel()]
        weights = not norms or bool(torch.isfinite(torch.cat([n.to(norms[0].device) for n in norms])).all())
        bad = torch.tensor([0.0 if math.isfinite(pending) else 1.0, 0.0 if weights else 1.0], dtype=torch.float64)
        if self.info.world_size > 1:
            dist.all_reduce(bad, group=self.info.meta_group)
        if bad[0] > 0:
            self._diverged("train/loss is not finite")
        if bad[1] > 0:
            self._diverged("the weights are not finite")

    def _diverged(self, what: str) -> None:
        """Stop every rank with an error that says where, why, and which checkpoint is still good."""
        tag = checkpoint.latest_tag(self.out)
        kept = (f"the last checkpoint, {checkpoint.checkpoint_root(self.out) / tag}, predates it" if tag
                else "no checkpoint was written")
        o = self.cfg.optimizer
        raise Diverged(f"training diverged by step {self.state.step} (epoch {self.state.epoch}): {what}; {kept}. "
                       f"Check optimizer.lr (now {o.lr:g}), optimizer.weight_decay (now {o.weight_decay:g}) "
                       f"and train.grad_clip (now {self.cfg.train.grad_clip:g})")

    def _finish(self) -> dict:
        last = self._last.get("record") or self._log(eval_now=True)
        if last["step"] != self.state.step or "eval/loss" not in last:
            last = self._log(eval_now=True)
        summary = dict(last)
        summary["status"] = "completed"
        summary["energy/metabolic_ratio"] = (summary["energy/metabolic"] / summary["energy/metabolic_min"]
                                             if summary["energy/metabolic_min"] else None)
        summary["epochs"] = self.history
        summary["dataset_size"] = self.task.num_train
        summary["compute/forward_flops_per_sample"] = self.flops_per_sample
        summary["model/params"] = self.num_params
        if hasattr(self.task, "tokenizer"):
            from metabolic.data.text import unigram_entropy
            from metabolic.models.lm import save_hf

            summary["data/unigram_entropy"] = unigram_entropy(self.task.train, self.task.vocab_size)
            save_hf(self.engine.module, self.task.tokenizer, self.out / "hf_model", self.is_main)
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            try:
                from metabolic.engine.report import plot_run

                plot_run(self.out)
            except Exception as err:  # a plot must never lose a finished run
                print(f"[metabolic] report.png not written: {err}", file=sys.stderr)
        return summary


# Dense bf16 peak FLOP/s of accelerators whose figure is published (model FLOPs utilisation).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def throughput(record: dict, last: dict, world_size: int, device: torch.device) -> dict:
    """Rates over the interval since the last record: samples/s, tokens/s, and MFU where a peak is known."""
    dt = record["time/wall_s"] - last.get("time/wall_s", 0.0)
    rate = lambda key: (record[key] - last.get(key, 0)) / dt if dt > 0 else None  # noqa: E731
    out = {"time/samples_per_s": rate("data/samples_backward"), "time/tokens_per_s": rate("data/tokens")}
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    flops_rate = rate("compute/flops")
    out["compute/mfu"] = flops_rate / (peak * world_size) if peak and flops_rate is not None else None
    return out


def train(cfg: ExperimentConfig) -> dict:
    """Train one experiment in this process (any launcher, or none); ends the process group."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "metabolic" / "torch_extensions"))
    info = init_distributed(cfg.train.collective_timeout_s)
    try:
        summary = Trainer(cfg, info).run()
    except BaseException:
        # No barrier here: a rank that failed alone would leave the others waiting in it forever.
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown_distributed()
    return summary
