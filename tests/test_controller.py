"""The joint energy controller: dual ascent direction, plan shape, and meeting a budget."""

import math

import pytest
import torch

from helpers import CONFIG, SMALL, metabolic, ok, records, summary
from metabolic.engine.controller import JointController
from metabolic.engine.policies import PriceThreshold


def _controller(budget=100.0, schedule="constant"):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    for g in opt.param_groups:
        g["price"] = 0.0
    policy = PriceThreshold(0.0)
    return JointController(0.5, budget, step=0.5, data_scale=2.0, optimizer=opt, policy=policy,
                           schedule=schedule), opt, policy


def test_price_rises_when_overspending_and_falls_when_underspending():
    """Each step's spend is compared with its share of the budget still left (constant plan)."""
    c, opt, policy = _controller()
    assert opt.param_groups[0]["price"] == 0.5 and policy.price == 1.0  # one price, published to both sides
    up = c.update(spent=10.0, progress=0.05)  # share 5 of 100: spent twice that, gap +1
    assert up == pytest.approx(0.5 * math.exp(0.5)) and opt.param_groups[0]["price"] == up
    assert policy.price == 1.0  # samples are priced once per epoch plan, not per step
    down = c.update(spent=12.0, progress=0.15)  # 90 left over 0.95 of the plan: share 9.47, spent 2
    assert down == pytest.approx(up * math.exp(0.5 * (2.0 / (90 * 0.10 / 0.95) - 1.0)))
    same = c.update(spent=12.0 + 88.0 * 0.10 / 0.85, progress=0.25)  # exactly its share
    assert same == pytest.approx(down)
    assert c.update(spent=12.0 + 88.0 * 0.10 / 0.85, progress=0.25) == same  # no progress: no step
    c.begin_epoch()  # the next plan pays the geometric mean of the epoch's lambdas
    assert policy.price == pytest.approx(2.0 * math.exp((math.log(up) + math.log(down) + math.log(same)) / 3))


def test_a_shortfall_does_not_wind_the_price_down_while_steps_overspend():
    """Half the run spent nothing (say the data side was closed); then a step spends 4x the share
    that the remaining budget gives it. The running total is still far below a fixed plan (40 of
    55), but the price must rise, or the run overshoots its budget once spending resumes."""
    c, _, _ = _controller()
    c.update(spent=0.0, progress=0.5)
    before = c.price
    assert c.update(spent=40.0, progress=0.55) == pytest.approx(before * math.exp(0.5 * 3.0))
    over = c.update(spent=120.0, progress=0.6)  # past the budget: the gap is taken at its cap
    assert over == pytest.approx(c.price) and over == pytest.approx(before * math.exp(0.5 * 3.0 + 0.5 * 5.0))
    fresh, _, _ = _controller()
    fresh.load_state_dict({"price": 0.5})  # a checkpoint from before the pace was saved
    assert fresh.update(spent=50.0, progress=0.5) == 0.5  # anchors instead of pacing from zero
    assert fresh.update(spent=55.0, progress=0.55) == pytest.approx(0.5)  # 50 left, share 5: on plan


def test_fixed_price_without_budget_and_cosine_plan():
    c, _, _ = _controller(budget=None)
    assert c.update(spent=1e9, progress=0.5) == 0.5
    cos, _, _ = _controller(schedule="cosine")
    assert cos.planned_fraction(0.0) == 0.0 and cos.planned_fraction(1.0) == pytest.approx(1.0)
    assert cos.planned_fraction(0.5) > 0.5  # a decaying rate spends more early


def test_an_epoch_without_steps_moves_the_price_by_the_steps_it_stands_for():
    """log lambda moves by step * k * gap: k = 1 per optimizer step; the end of an epoch that took
    no step counts the steps it takes with every sample (idle_steps), at most a factor e."""
    c = JointController(1.0, 100.0, step=0.1, data_scale=1.0)
    one = c.update(spent=0.0, progress=0.01)  # nothing spent: gap -1
    assert one == pytest.approx(math.exp(-0.1))
    sparse = c.update(spent=0.0, progress=0.03)  # a step of an epoch that kept half the samples: still k = 1
    assert sparse == pytest.approx(one * math.exp(-0.1))
    idle = c.update(spent=0.0, progress=0.08, idle_steps=5)  # an empty epoch of 5 full-data steps: k = 5
    assert idle == pytest.approx(sparse * math.exp(-0.5))
    capped = c.update(spent=0.0, progress=0.5, idle_steps=42)  # k = 42: e^-4.2, capped at e^-1
    assert capped == pytest.approx(idle * math.exp(-1.0))


@pytest.mark.parametrize("per, given", [("run", 200.0), ("epoch", 200.0 / 3)])
def test_controller_meets_budget_on_a_small_run(tmp_path, fmnist, per, given):
    """Dense AdamW on this run spends about 610 (alpha=1); the controller is asked for a third of it,
    for the run or as a third of that per epoch (3 epochs)."""
    budget = 200.0
    out = tmp_path / "ctl"
    ok(metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=3", "train.micro_batch_size=16",
                 "optimizer.name=masked_adamw", "optimizer.select=soft", "data.policy=price",
                 "energy.controller=true", f"energy.budget={given}", f"energy.budget_per={per}", "energy.price=0.001",
                 "energy.price_step=1.0", "energy.data_scale=300"))
    s = summary(out)
    assert abs(s["energy/metabolic"] - budget) <= 0.1 * budget, s["energy/metabolic"]
    prices = [r["energy/price"] for r in records(out)]
    assert len(set(prices)) > 3  # the price was actually steered
    # Both sides were priced: some weights did not change, and the data plan dropped samples.
    assert s["energy/changed_weights"] < 0.9 * s["step"] * s["energy/num_weights"]
    assert min(e["kept_fraction"] for e in s["epochs"]) < 1.0 and s["data/samples_backward"] < 3 * 384


def test_relative_data_units_price_samples_against_the_mean_first_moment():
    """threshold = data_scale * lambda * mean(1 - p) / mean|m_hat|, both means measured, not assumed."""
    from metabolic.engine.score_table import ScoreTable
    from metabolic.kernels import MaskedAdamW

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50))
    opt = MaskedAdamW([w], lr=0.01, select="soft", price=0.0)
    for _ in range(3):
        w.grad = torch.randn(50)
        opt.step()
    st = opt.state[w]
    m_hat = st["exp_avg"].abs().mean().item() / (1 - 0.9 ** st["step"])
    table = ScoreTable(8, relative=False)
    prob = torch.tensor([0.9, 0.5, 0.2, 0.99, 0.6, 0.7])
    table.update(torch.arange(6), loss=-prob.log(), prob=prob, correct=prob > 0.5,
                 epoch=torch.zeros(6, dtype=torch.int32))
    policy = PriceThreshold(0.0)
    c = JointController(0.02, None, step=0.5, data_scale=3.0, optimizer=opt, policy=policy)
    assert policy.price == pytest.approx(3.0 * 0.02)  # absolute until calibrated
    c.calibrate_epoch(table, opt)
    mean_gap = (1 - prob).double().mean().item()  # unscored rows 6, 7 are left out
    assert policy.price == pytest.approx(3.0 * 0.02 * mean_gap / m_hat, rel=1e-6)
    c2 = JointController(0.02, None, step=0.5, data_scale=3.0, optimizer=opt, policy=PriceThreshold(0.0))
    c2.load_state_dict(c.state_dict())  # the calibration travels in checkpoints
    assert c2.data_threshold == pytest.approx(c.data_threshold)


def test_relative_data_units_need_masked_adamw():
    from metabolic.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="energy.data_units"):
        load_config(CONFIG, ["energy.data_units=relative", "optimizer.name=adamw"])
    with pytest.raises(ConfigError, match="energy.data_units"):
        load_config(CONFIG, ["energy.data_units=percent"])


def test_a_budget_warns_about_the_optimizer_settings_it_cannot_steer():
    from metabolic.engine.config import load_config
    from metabolic.engine.controller import budget_caveats

    paced = ["optimizer.name=masked_adamw", "optimizer.select=soft", "energy.controller=true", "energy.budget=100"]
    assert budget_caveats(load_config(CONFIG, paced)) == []
    caveats = budget_caveats(load_config(CONFIG, [*paced, "optimizer.residual=true", "optimizer.count_price=1e-6"]))
    assert [c.split()[0] for c in caveats] == ["optimizer.residual=true", "optimizer.count_price"]
    fixed = [p for p in paced if "budget" not in p]  # a fixed price is not steered: nothing to warn about
    assert budget_caveats(load_config(CONFIG, [*fixed, "optimizer.residual=true"])) == []


def test_an_epoch_that_keeps_no_sample_still_lowers_the_price(tmp_path, fmnist):
    """Far under budget, with a slow price step that keeps the data threshold (10 * lambda) above
    any gap (1 - p <= 1) and re-pricing before the epoch off: epochs 2-4 plan no sample and take
    no step, and only the epoch-end update can bring lambda down."""
    out = tmp_path / "empty"
    ok(metabolic("train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=4", "data.policy=price",
                 "energy.controller=true", "energy.budget=1e6", "energy.price=1.0", "energy.price_step=0.01",
                 "energy.data_scale=10", "energy.reprice_empty=0"))
    s = summary(out)
    assert [e["kept_fraction"] for e in s["epochs"]][1:] == [0.0, 0.0, 0.0]
    ends = [r for r in records(out) if "eval/accuracy" in r]  # one record per epoch end
    prices = [r["energy/price"] for r in ends]
    assert len(prices) == 4 and all(b < a for a, b in zip(prices, prices[1:])), prices
    assert len({r["step"] for r in ends[1:]}) == 1  # no step was taken after epoch 1


def test_an_empty_plan_with_budget_left_is_repriced_before_the_epoch(tmp_path, fmnist):
    """Same run with re-pricing on (energy.reprice_empty, off by default): each empty plan
    lowers lambda by e and plans again, so no epoch is wasted; with the budget spent, an empty
    plan stays empty."""
    args = [*SMALL, "train.epochs=3", "data.policy=price", "energy.controller=true", "energy.price=1.0",
            "energy.price_step=0.01", "energy.data_scale=10", "energy.reprice_empty=5"]
    out = tmp_path / "repriced"
    ok(metabolic("train", str(CONFIG), f"output_dir={out}", *args, "energy.budget=1e6"))
    kept = [e["kept_fraction"] for e in summary(out)["epochs"]]
    assert kept[0] == 1.0 and all(k > 0 for k in kept[1:]), kept
    # the first record of epoch 2 trained at a price at least e^-3 below the end of epoch 1
    # (10 * lambda must fall below 1 - p, which is below 1, before any sample passes)
    ends = [r for r in records(out) if "eval/accuracy" in r]
    first = next(r for r in records(out) if r["epoch"] == 1 and r["step"] > ends[0]["step"])
    assert first["energy/data_threshold"] < 1.0 < ends[0]["energy/data_threshold"]
    spent = tmp_path / "spent"  # a budget already spent in epoch 1: nothing to re-price with
    ok(metabolic("train", str(CONFIG), f"output_dir={spent}", *args, "energy.budget=1e-3"))
    assert [e["kept_fraction"] for e in summary(spent)["epochs"]][1:] == [0.0, 0.0]
