"""The reference masked step: its semantics, checked against first principles."""

import math

import pytest
import kernel_cases
import torch

from metabolic.kernels.reference import reference_step
from metabolic.kernels.spec import StepSpec, element_hash, fmix32, hash_base
from metabolic.kernels.threshold import sample_indices

N = 50_000


def make_case(kind: str, residual: bool, n: int = N, seed: int = 0):
    return kernel_cases.make_case(kind, residual, n, seed)


def spec_for(kind: str, rule: str, alpha: float = 1.0, residual: bool = False, **kw) -> StepSpec:
    price = 1e-4 if kind == "adamw" else 1e-3
    args = dict(kind=kind, lr=1e-3, weight_decay=0.01, momentum=0.9, select=rule, fraction=0.1,
                price=price, alpha=alpha, residual=residual, block_size=500, step=3, seed=1, salt=2)
    args.update(kw)
    return StepSpec(**args)


def candidate(kind, p, g, state, spec):
    """u and eta written out independently of reference.py (float64 for clarity)."""
    p, g = p.double(), g.double()
    if kind == "adamw":
        m = spec.beta1 * state["exp_avg"].double() + (1 - spec.beta1) * g
        v = spec.beta2 * state["exp_avg_sq"].double() + (1 - spec.beta2) * g * g
        m_hat = m / (1 - spec.beta1 ** spec.step)
        v_hat = v / (1 - spec.beta2 ** spec.step)
        eta = spec.lr / (v_hat.sqrt() + spec.eps)
        u = -eta * m_hat - spec.lr * spec.weight_decay * p
    else:
        d = g + spec.weight_decay * p
        buf = spec.momentum * state["momentum_buffer"].double() + d
        u = -spec.lr * buf
        eta = torch.full_like(u, spec.lr)
    return u, eta


RULES = ["dense", "topk", "hard", "soft", "random", "block"]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_energy_equals_snapshot_difference(kind, rule, alpha):
    p, g, state = make_case(kind, residual=False)
    before = p.clone()
    energy, changed = reference_step(p, g, state, spec_for(kind, rule, alpha))
    d = p - before
    nz = d != 0
    expected = float(nz.sum()) if alpha == 0 else float((d[nz].abs().double() ** alpha).sum())
    assert changed == int(nz.sum())
    assert energy == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("rule", RULES)
def test_residual_conserves_candidate_update(kind, rule):
    p, g, state = make_case(kind, residual=True)
    spec = spec_for(kind, rule, residual=True)
    u, _ = candidate(kind, p, g, state, spec)
    old_r = state["residual"].double().clone()
    before = p.clone()
    reference_step(p, g, state, spec)
    applied = (p - before).double()
    # applied + new residual == u + old residual (up to fp32 rounding of p)
    torch.testing.assert_close(applied + state["residual"].double(), u + old_r, atol=2e-7, rtol=1e-4)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("rule", ["topk", "hard", "soft"])
def test_fading_residual_keeps_decay_times_the_unapplied_part(kind, rule):
    p, g, state = make_case(kind, residual=True)
    spec = spec_for(kind, rule, residual=True, residual_decay=0.25)
    u, _ = candidate(kind, p, g, state, spec)
    old_r = state["residual"].double().clone()
    before = p.clone()
    reference_step(p, g, state, spec)
    unapplied = u + old_r - (p - before).double()
    assert unapplied.abs().max() > 0  # the rule left something out
    torch.testing.assert_close(state["residual"].double(), 0.25 * unapplied, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_residual_decay_zero_is_no_residual(kind):
    # decay 0 forgets every unapplied part at once: the same steps as discarding them
    p, g, state = make_case(kind, residual=True)
    state["residual"].zero_()
    p2, state2 = p.clone(), {k: v.clone() for k, v in state.items() if k != "residual"}
    for step in (1, 2, 3):
        reference_step(p, g, state, spec_for(kind, "hard", residual=True, residual_decay=0.0, step=step))
        reference_step(p2, g, state2, spec_for(kind, "hard", step=step))
        assert torch.equal(p, p2)
        assert not state["residual"].any()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_soft_count_price_minimises_the_two_part_price(kind):
    # per coordinate: argmin (dw - u)^2 / (2 eta) + price |dw| + count_price [dw != 0]
    p, g, state = make_case(kind, residual=False)
    spec = spec_for(kind, "soft", count_price=3e-6)
    u, eta = candidate(kind, p, g, state, spec)
    before = p.clone()
    _, changed = reference_step(p, g, state, spec)
    applied = (p - before).double()
    t = (u.abs() - spec.price * eta).clamp(min=0)

    def cost(dw):
        return (dw - u) ** 2 / (2 * eta) + spec.price * dw.abs() + spec.count_price * (dw != 0)

    best = torch.minimum(cost(torch.zeros_like(u)), cost(torch.sign(u) * t))
    assert (cost(applied) - best).abs().max() <= 1e-9  # the applied change is a minimiser
    plain = int((t > 0).sum())
    assert 0 < changed < plain  # the fee holds back some of the updates plain soft makes


def test_count_price_only_with_soft():
    with pytest.raises(ValueError, match="count_price applies to select='soft'"):
        spec_for("adamw", "hard", count_price=1e-6)
    with pytest.raises(ValueError, match="count_price must be"):
        spec_for("adamw", "soft", count_price=-1.0)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_soft_and_hard_follow_the_per_coordinate_rules(kind):
    for rule in ("soft", "hard"):
        p, g, state = make_case(kind, residual=False)
        # SGD's eta is lr: a soft price of 0.1 shrinks each update by 1e-4, far above rounding
        spec = spec_for(kind, rule, **({"price": 0.1} if (kind, rule) == ("sgd", "soft") else {}))
        u, eta = candidate(kind, p, g, state, spec)
        before = p.clone()
        reference_step(p, g, state, spec)
        applied = (p - before).double()
        if rule == "soft":
            expected = torch.sign(u) * torch.clamp(u.abs() - spec.price * eta, min=0)
        else:
            expected = torch.where(u * u / (2 * eta) > spec.price, u, torch.zeros_like(u))
        # fp32 rounding of p + dw: two ulps of the weight, and a relative 1e-6 of the change
        tol = 2 * torch.finfo(torch.float32).eps * before.double().abs() + 1e-6 * expected.abs()
        close = (applied - expected).abs() <= tol
        if rule == "soft":
            assert bool(close.all()), int((~close).sum())
        else:  # the hard rule may flip elements whose gain sits within rounding of the price
            assert close.float().mean() > 0.999
        assert 0.01 < (applied != 0).float().mean() < 1.0


def test_price_zero_soft_and_hard_are_dense():
    for rule in ("soft", "hard"):
        outs = []
        for r in (rule, "dense"):
            p, g, state = make_case("adamw", residual=False)
            reference_step(p, g, state, spec_for("adamw", r, price=0.0))
            outs.append(p)
        torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@pytest.mark.parametrize("rule", ["topk", "random", "block"])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.5])
def test_achieved_fraction_is_close_to_target(rule, fraction):
    p, g, state = make_case("adamw", residual=False, n=200_000)
    spec = spec_for("adamw", rule, fraction=fraction)
    _, changed = reference_step(p, g, state, spec)
    # the issue asks for 2 points; hold to 5% of the target (plus one block for the block rule)
    slack = 0.05 * fraction + (spec.block_size / p.numel() if rule == "block" else 0.0)
    assert abs(changed / p.numel() - fraction) < slack


def test_topk_keeps_the_largest_candidates():
    p, g, state = make_case("sgd", residual=False)
    spec = spec_for("sgd", "topk", weight_decay=0.0)
    u, _ = candidate("sgd", p, g, state, spec)
    before = p.clone()
    reference_step(p, g, state, spec)
    kept = (p - before) != 0
    assert u.abs()[kept].min() >= u.abs()[~kept].max() * (1 - 1e-5)


def test_block_rule_selects_whole_blocks():
    p, g, state = make_case("adamw", residual=False, n=50_000)
    spec = spec_for("adamw", "block", block_size=500, fraction=0.2)
    before = p.clone()
    reference_step(p, g, state, spec)
    per_block = ((p - before) != 0).view(-1, 500).float().mean(dim=1)
    assert set(per_block.round().tolist()) == {0.0, 1.0}
    assert per_block.sum().item() == pytest.approx(0.2 * 100, abs=1)


def test_unselected_moments_are_still_updated():
    p, g, state = make_case("adamw", residual=False)
    spec = spec_for("adamw", "random", fraction=0.1)
    expected_m = spec.beta1 * state["exp_avg"] + (1 - spec.beta1) * g
    before = p.clone()
    reference_step(p, g, state, spec)
    unselected = p == before
    assert unselected.float().mean() > 0.85
    torch.testing.assert_close(state["exp_avg"][unselected], expected_m[unselected])


def test_alpha_zero_counts_changed_weights():
    p, g, state = make_case("adamw", residual=False)
    energy, changed = reference_step(p, g, state, spec_for("adamw", "topk", alpha=0.0))
    assert energy == changed > 0


def test_hash_matches_python_scalar_fmix():
    idx = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**32 - 1], dtype=torch.int64)
    base = hash_base(7, 3, 1)
    want = [fmix32((int(i) & 0xFFFFFFFF) ^ base) for i in idx]
    assert element_hash(idx, base).tolist() == want
    # known murmur3 fmix32 value, guards against a silently changed constant
    assert fmix32(1) == 0x514E28B7


def test_sample_indices_cover_the_buffer_deterministically():
    a = sample_indices(1_000_000, seed=1, step=2, salt=3, device=torch.device("cpu"))
    b = sample_indices(1_000_000, seed=1, step=2, salt=3, device=torch.device("cpu"))
    assert torch.equal(a, b) and a.numel() == 16384
    assert a.min() >= 0 and a.max() < 1_000_000 and torch.all(a[1:] > a[:-1])
    # strata are equal width: consecutive samples at most two strata widths apart
    assert (a[1:] - a[:-1]).max() < 2 * math.ceil(1_000_000 / 16384)
