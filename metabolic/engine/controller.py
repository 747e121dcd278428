"""One energy price for samples and synapses, tuned by dual ascent to meet an energy budget.

The relaxed problem `min L(w_T) + lambda * M` (DESIGN.md section 1) gives both rules:
- a weight changes when its candidate update passes the threshold at lambda (the masked
  optimizer's hard/soft rule reads `param_group["price"]`);
- a sample is trained on when its gradient-magnitude proxy (1 - p(y|x), or its loss for LMs)
  exceeds `data_scale * lambda` (the data service's `price` policy reads `policy.price`).
With AdamW both quantities live on a unit scale (the normalised update |m/sqrt(v)| and
1 - p are both in about [0, 1]), so data_scale = 1 puts them on the same price.

With a budget B the controller paces the spend: after each optimizer step it compares what the
step spent with the share of the remaining budget that the plan gives the step, and raises
lambda when the step spent more, lowers it when less (multiplicative dual ascent):
    lambda <- lambda * exp(step * k * (spent_step / planned_step - 1)),
    planned_step = (B - spent_before) * (F(p) - F(p_before)) / (1 - F(p_before)),
with k = 1 after each optimizer step; once B is spent the gap is taken at its cap. Comparing
rates against the remaining budget, not the running total against a fixed plan, keeps an early
shortfall from winding lambda down: once the data side reopened after an empty epoch, the
running total stayed below plan while each step spent many times its share, lambda kept
falling, and the run overshot its budget by 18%.
An epoch whose plan keeps no sample takes no step. With budget left, such a plan can be
re-priced before the epoch (lambda / e, up to energy.reprice_empty times, off by default); one
that stays empty counts at its end as the steps it takes with every sample (k = idle_steps, one
update moving lambda by at most a factor e), or else a price that closed the data side would
barely move and keep it closed for the rest of the run.
An update's size follows the learning rate, so the plan F spreads B like the schedule does:
F(p) = p for a constant rate, F(p) = p + sin(pi p) / pi for cosine decay (the integral of
0.5 (1 + cos(pi x)) over [0, p], normalised); a linear plan would overspend early and be left
unable to spend late, when the rate is near zero.
Every rank computes the same lambda from the same globally reduced spend.

Relative data units (energy.data_units=relative) remove the hand-tuned data_scale: the soft
rule keeps weight i when |m_hat_i| > lambda, and a sample's share of that first moment scales
with its proxy relative to the mean proxy, so a sample is kept when
    proxy / mean(proxy) > lambda / mean|m_hat|        (times data_scale, default 1),
i.e. both sides compare a magnitude relative to its mean with the same relative price. The two
means are measured once per epoch, before the epoch is planned.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.distributed as dist

MIN_PRICE, MAX_PRICE = 1e-8, 1e3
MAX_IDLE_LOG_STEP = 1.0  # an empty epoch's end moves lambda by at most a factor e


class JointController:
    """Holds lambda and pushes it to the optimizer's param groups and the data policy."""

    def __init__(self, price: float, budget: Optional[float], step: float, data_scale: float,
                 optimizer=None, policy=None, schedule: str = "constant", relative: bool = False,
                 reprice_limit: int = 0) -> None:
        self.price = max(float(price), MIN_PRICE) if budget is not None else float(price)
        self.budget, self.step, self.data_scale, self.schedule = budget, step, data_scale, schedule
        self.optimizer, self.policy, self.relative = optimizer, policy, relative
        self.data_units = 1.0  # proxy units per unit of lambda (relative mode: mean proxy / mean |m_hat|)
        self.data_price = self.price  # lambda the current epoch's plan was made at
        self._log_sum, self._count = 0.0, 0  # log lambda over the steps since that plan
        self._spent, self._progress = 0.0, 0.0  # at the last update: the pace is measured from there
        self.reprice_limit = reprice_limit  # re-pricings of an empty epoch plan (energy.reprice_empty)
        self.apply()

    @property
    def data_threshold(self) -> float:
        """Threshold on the sample proxy at the price of the current epoch's plan."""
        return self.data_scale * self.data_units * self.data_price

    def begin_epoch(self, table=None, optimizer=None, group=None) -> None:
        """Price the next plan at the geometric mean of lambda over the last epoch: weights see
        every step's lambda, but samples are chosen once per epoch, and the instantaneous lambda
        of dual ascent swings too much to decide a whole epoch on. Relative units are measured
        here too, from the score table and the optimizer's first moments."""
        if self.relative and table is not None:
            self.calibrate_epoch(table, optimizer, group)
        if self._count:
            self.data_price = math.exp(self._log_sum / self._count)
        elif self.budget is None:
            self.data_price = self.price
        self._log_sum, self._count = 0.0, 0
        self.apply()

    def reprice_empty_plan(self, spent: float) -> bool:
        """Before an epoch whose plan keeps no sample: with budget left, lower lambda by the most
        one epoch-end update may move it (a factor e) and price the plan there; False (nothing
        changed) without a budget or with none left. An empty epoch takes no step, so lowering
        the price only after it would waste the epoch, and the run's last epoch entirely."""
        if self.budget is None or spent >= self.budget:
            return False
        factor = math.exp(-MAX_IDLE_LOG_STEP)
        self.price = max(self.price * factor, MIN_PRICE)
        self.data_price = max(self.data_price * factor, MIN_PRICE)
        self.apply()
        return True

    def calibrate_data(self, mean_proxy: float, mean_abs_moment: float) -> None:
        """Relative units: a sample pays lambda / mean|m_hat| per unit of proxy / mean proxy."""
        if mean_proxy > 0 and mean_abs_moment > 0:
            self.data_units = mean_proxy / mean_abs_moment
            self.apply()

    def apply(self) -> None:
        """Publish lambda: weights see it at their next step, samples at the next epoch plan."""
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["price"] = self.price
        if self.policy is not None:
            self.policy.price = self.data_threshold

    def planned_fraction(self, progress: float) -> float:
        """F(progress): the share of the budget planned to be spent by then."""
        p = min(max(progress, 0.0), 1.0)
        return p + math.sin(math.pi * p) / math.pi if self.schedule == "cosine" else p

    def update(self, spent: float, progress: float, idle_steps: int = 0) -> float:
        """One dual-ascent step from the global spend so far and the run's progress in [0, 1];
        `idle_steps`: at the end of an epoch that took no step, the steps it takes with every sample."""
        if self.budget is not None and self._progress < 0:  # a checkpoint without the pace's anchor
            self._spent, self._progress = spent, progress
        if self.budget is None or progress <= self._progress:
            return self.price  # no budget, or no progress since the last update: nothing to pace
        done = self.planned_fraction(self._progress)
        share = (self.planned_fraction(progress) - done) / (1.0 - done) if done < 1.0 else 1.0
        planned = (self.budget - self._spent) * share
        step_spent = spent - self._spent
        self._spent, self._progress = spent, progress
        gap = 5.0 if planned <= 0 else max(min(step_spent / planned - 1.0, 5.0), -5.0)
        log_step = self.step * gap
        if idle_steps:  # the steps this empty epoch stands for, at most a factor e
            log_step = max(min(log_step * idle_steps, MAX_IDLE_LOG_STEP), -MAX_IDLE_LOG_STEP)
        self.price = min(max(self.price * math.exp(log_step), MIN_PRICE), MAX_PRICE)
        self._log_sum += math.log(self.price)
        self._count += 1
        self.apply()
        return self.price

    def calibrate_epoch(self, table, optimizer, group=None) -> None:
        """Measure both means before an epoch is planned (relative units; every rank gets the same)."""
        if self.policy is None:
            return
        scored = table.scored()
        if table.count(scored) == 0:
            return  # first epoch: every sample is unscored and kept anyway
        mean_proxy = table.mean(self.policy.proxy_values(table), scored)
        self.calibrate_data(mean_proxy, mean_abs_first_moment(optimizer, group))

    def state_dict(self) -> dict:
        return {"price": self.price, "data_units": self.data_units, "data_price": self.data_price,
                "log_sum": self._log_sum, "count": self._count, "spent": self._spent,
                "progress": self._progress}

    def load_state_dict(self, state: dict) -> None:
        self.price = float(state["price"])
        self.data_units = float(state.get("data_units", 1.0))
        self.data_price = float(state.get("data_price", self.price))
        self._log_sum, self._count = float(state.get("log_sum", 0.0)), int(state.get("count", 0))
        # older checkpoints lack the anchor: the next update sets it instead of pacing from zero
        self._spent = float(state.get("spent", 0.0))
        self._progress = float(state.get("progress", -1.0))
        self.apply()


def mean_abs_first_moment(optimizer, group=None) -> float:
    """Global mean of AdamW's bias-corrected first moment |m_hat| over every rank's weights."""
    total, count = 0.0, 0
    for g in optimizer.param_groups:
        beta1 = g["betas"][0]
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            if "exp_avg" in st and st.get("step", 0) > 0:
                total += float(st["exp_avg"].abs().sum(dtype=torch.float64)) / (1.0 - beta1 ** st["step"])
                count += st["exp_avg"].numel()
    vec = torch.tensor([total, float(count)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(vec, group=group)
    return float(vec[0] / vec[1]) if vec[1] > 0 else 0.0


def budget_caveats(cfg) -> list[str]:
    """Optimizer settings that a budget cannot steer (measured in benchmarks/RESULTS.md)."""
    o, out = cfg.optimizer, []
    if not (cfg.energy.controller and cfg.energy.budget is not None and o.select in ("hard", "soft")):
        return out
    if o.residual:
        out.append("optimizer.residual=true pays held-back updates later whatever the price, so the "
                   "budget's dual ascent tends to drive lambda to its cap")
    if o.count_price > 0:
        out.append("optimizer.count_price is a fixed fee the budget does not move; once the rate has "
                   "decayed it can block all spending and leave the budget unspent")
    return out


def build_controller(cfg, optimizer, policy, is_main: bool = True) -> Optional[JointController]:
    """The controller when energy.controller is on; it prices whichever sides are priced by config."""
    e = cfg.energy
    if not e.controller:
        return None
    for caveat in budget_caveats(cfg) if is_main else []:
        print(f"[metabolic] warning: energy.budget with {caveat} (docs/energy_price.md)", file=sys.stderr)
    weights = optimizer if cfg.optimizer.select in ("hard", "soft") else None
    data = policy if cfg.data.policy == "price" else None
    budget = None
    if e.budget is not None:
        budget = e.budget * (cfg.train.epochs if e.budget_per == "epoch" else 1)
    return JointController(e.price, budget, e.price_step, e.data_scale, optimizer=weights, policy=data,
                           schedule=cfg.train.lr_schedule, relative=e.data_units == "relative",
                           reprice_limit=e.reprice_empty if data is not None else 0)
