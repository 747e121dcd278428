"""Every data policy against a small reference written for clarity, on a synthetic score table."""

import math

import pytest
import torch

from metabolic.engine.config import ConfigError, DataConfig, load_config
from metabolic.engine.policies import (DifficultyDropout, FullData, InfoBatch, MatchedRandomDropout, PriceThreshold,
                                       RandomDropout, build_policy)
from metabolic.engine.score_table import ScoreTable

N, EPOCHS = 40, 6


def synthetic_table(relative: bool = False, seed: int = 0) -> ScoreTable:
    """40 samples: random losses, p = exp(-loss), correct when p > 0.5; the first 5 never scored."""
    g = torch.Generator().manual_seed(seed)
    t = ScoreTable(N, relative=relative)
    loss = torch.rand(N, generator=g) * 3
    idx = torch.arange(5, N)
    t.observe_level(1.0)
    t.update(idx, loss[5:], (-loss[5:]).exp(), (-loss[5:]).exp() > 0.5, torch.full((N - 5,), 2))
    return t


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- references: one sample at a time ---------------------------------------------------------------
def ref_difficulty(t: ScoreTable, tau: float) -> list[int]:
    keep = []
    for i in range(len(t)):
        if t.epoch[i] < 0:
            keep.append(i)  # never scored: train on it
        elif tau == 0:
            if not t.correct[i]:
                keep.append(i)
        elif t.prob[i] < tau:
            keep.append(i)
    return keep


def ref_infobatch(t: ScoreTable, r: float, draws: torch.Tensor) -> tuple[list[int], list[float]]:
    scored = [i for i in range(len(t)) if t.epoch[i] >= 0]
    mean = sum(float(t.loss[i]) for i in scored) / len(scored)
    keep, weights = [], []
    for i in range(len(t)):
        low = t.epoch[i] >= 0 and float(t.loss[i]) < mean
        if low and float(draws[i]) < r:
            continue  # pruned
        keep.append(i)
        weights.append(1.0 / (1.0 - r) if low else 1.0)
    return keep, weights


def test_full_keeps_everything_with_unit_weights():
    active, w = FullData().select(synthetic_table(), 3, EPOCHS, gen())
    assert active.tolist() == list(range(N)) and active.dtype == torch.int64
    assert torch.equal(w, torch.ones(N))


@pytest.mark.parametrize("tau", [0.0, 0.2, 0.5, 0.9])
def test_difficulty_matches_reference(tau):
    t = synthetic_table()
    active, w = DifficultyDropout(tau).select(t, 2, EPOCHS, gen())
    expected = ref_difficulty(t, tau)
    assert active.tolist() == expected and torch.equal(w, torch.ones(len(expected)))
    assert set(range(5)) <= set(expected)  # unscored samples are always trained on
    assert 5 < len(expected) < N  # the synthetic table makes the rule bite


def test_lazy_is_tau_zero_misclassified_only():
    t = synthetic_table()
    lazy = build_policy(DataConfig(policy="lazy", tau=0.9))
    active, _ = lazy.select(t, 1, EPOCHS, gen())
    assert active.tolist() == [i for i in range(N) if i < 5 or not t.correct[i]]


def test_difficulty_first_epoch_trains_on_everything():
    active, _ = DifficultyDropout(0.3).select(ScoreTable(N), 0, EPOCHS, gen())
    assert active.tolist() == list(range(N))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 1.0])
def test_random_keeps_gamma_power_t(gamma):
    t = synthetic_table()
    for epoch in range(EPOCHS):
        active, w = RandomDropout(gamma).select(t, epoch, EPOCHS, gen(epoch))
        assert active.numel() == math.ceil(gamma ** epoch * N - 1e-9)
        assert active.unique().numel() == active.numel() and bool((active[1:] > active[:-1]).all())
        assert torch.equal(w, torch.ones(active.numel()))
    # The same generator gives the same subset; another gives another.
    a, _ = RandomDropout(0.5).select(t, 1, EPOCHS, gen(1))
    b, _ = RandomDropout(0.5).select(t, 1, EPOCHS, gen(1))
    c, _ = RandomDropout(0.5).select(t, 1, EPOCHS, gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_matched_keeps_as_many_as_difficulty_at_random():
    t = synthetic_table()
    dbpd = ref_difficulty(t, 0.5)
    sets = [MatchedRandomDropout(0.5).select(t, 2, EPOCHS, gen(s))[0] for s in range(5)]
    assert all(s.numel() == len(dbpd) for s in sets)
    assert any(s.tolist() != dbpd for s in sets)  # chosen at random, not by difficulty
    assert len({tuple(s.tolist()) for s in sets}) > 1


def test_infobatch_matches_reference():
    t, r = synthetic_table(), 0.5
    active, w = InfoBatch(r, anneal=0.875).select(t, 1, EPOCHS, gen(11))
    keep, weights = ref_infobatch(t, r, torch.rand(N, generator=gen(11)))
    assert active.tolist() == keep
    assert w.tolist() == pytest.approx(weights)
    assert 2.0 in w.tolist() and len(keep) < N  # some low-loss samples kept with weight 1/(1-r), some pruned


def test_infobatch_anneals_to_full_data_and_ignores_unscored():
    t = synthetic_table()
    # delta = 0.5 of 6 epochs: prune in epochs 0-2, full data from epoch 3 on.
    assert InfoBatch(0.5, anneal=0.5).select(t, 3, EPOCHS, gen())[0].numel() == N
    assert InfoBatch(0.5, anneal=0.5).select(t, 2, EPOCHS, gen())[0].numel() < N
    empty = ScoreTable(N)
    active, w = InfoBatch(0.9, anneal=1.0).select(empty, 1, EPOCHS, gen())
    assert active.numel() == N and torch.equal(w, torch.ones(N))


def test_price_threshold_is_settable_and_saved():
    t = synthetic_table()
    policy = PriceThreshold(0.2)
    active, _ = policy.select(t, 1, EPOCHS, gen())
    assert active.tolist() == [i for i in range(N) if i < 5 or 1 - float(t.prob[i]) > 0.2]
    policy.price = 0.8  # an external controller raises the price: fewer samples pass
    fewer, _ = policy.select(t, 1, EPOCHS, gen())
    assert fewer.tolist() == [i for i in range(N) if i < 5 or 1 - float(t.prob[i]) > 0.8]
    assert fewer.numel() < active.numel()
    restored = PriceThreshold(0.0)
    restored.load_state_dict(policy.state_dict())
    assert restored.price == 0.8
    by_loss, _ = PriceThreshold(1.0, proxy="loss").select(t, 1, EPOCHS, gen())
    assert by_loss.tolist() == [i for i in range(N) if i < 5 or float(t.loss[i]) > 1.0]


@pytest.mark.parametrize("policy", [FullData(2), DifficultyDropout(0.0, 2), RandomDropout(0.0, 2),
                                    MatchedRandomDropout(0.1, 2), InfoBatch(0.9, 1.0, 2), PriceThreshold(10.0, "gap", 2)])
def test_revision_epochs_use_all_data(policy):
    t = synthetic_table()
    for epoch in (EPOCHS - 2, EPOCHS - 1):
        active, w = policy.select(t, epoch, EPOCHS, gen())
        assert active.tolist() == list(range(N)) and torch.equal(w, torch.ones(N))
    if not isinstance(policy, FullData):
        assert policy.select(t, EPOCHS - 3, EPOCHS, gen())[0].numel() < N


def test_relative_scores_correct_stale_drift():
    """A loss recorded when the run's level was 3x higher counts for a third of it today."""
    t = ScoreTable(4, relative=True)
    t.observe_level(3.0)  # early: the model is bad, every loss is high
    t.update(torch.tensor([0, 1]), torch.tensor([2.4, 0.3]), torch.exp(-torch.tensor([2.4, 0.3])),
             torch.tensor([False, True]), torch.tensor([0, 0]))
    for _ in range(200):
        t.observe_level(1.0)  # later: the level fell to 1
    assert t.level_now == pytest.approx(1.0, rel=1e-6)
    t.update(torch.tensor([2, 3]), torch.tensor([1.2, 0.1]), torch.exp(-torch.tensor([1.2, 0.1])),
             torch.tensor([False, True]), torch.tensor([5, 5]))
    adj = t.adjusted_loss()
    assert adj.tolist() == pytest.approx([0.8, 0.1, 1.2, 0.1], rel=1e-5)
    # Raw InfoBatch/price would call stale sample 0 the hardest; relative scores rank sample 2 first.
    assert int(torch.argmax(t.loss)) == 0 and int(torch.argmax(adj)) == 2
    kept, _ = PriceThreshold(1.0, proxy="loss").select(t, 6, 10, gen())
    assert kept.tolist() == [2]
    t.relative = False
    assert PriceThreshold(1.0, proxy="loss").select(t, 6, 10, gen())[0].tolist() == [0, 2]


def test_build_policy_and_config_keys():
    cfg = load_config(None, ["data.policy=infobatch", "data.prune_ratio=0.3", "data.anneal=0.5",
                             "data.revision_epochs=2"])
    p = build_policy(cfg.data)
    assert isinstance(p, InfoBatch) and (p.prune_ratio, p.anneal, p.revision_epochs) == (0.3, 0.5, 2)
    assert build_policy(DataConfig(policy="pdd_difficulty")).refresh is True
    assert build_policy(DataConfig(policy="infobatch")).refresh is False
    assert build_policy(DataConfig(policy="infobatch", refresh=True)).refresh is True
    assert build_policy(DataConfig(policy="price", price=0.4)).price == 0.4
    for bad, key in (("data.policy=nope", "data.policy"), ("data.tau=1.5", "data.tau"),
                     ("data.gamma=-0.1", "data.gamma"), ("data.prune_ratio=1.0", "data.prune_ratio"),
                     ("data.anneal=2", "data.anneal"), ("data.revision_epochs=-1", "data.revision_epochs"),
                     ("data.price=-1", "data.price"), ("data.price_proxy=norm", "data.price_proxy")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])
