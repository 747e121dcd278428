"""data.screen: each planned micro-batch is scored at the current weights and only the samples the
difficulty rule keeps now are trained on; the screening forward is counted and changes nothing else."""

import pytest
import torch

from helpers import CONFIG, SMALL, comparable, metabolic, ok, records, stop_at_step, summary, torchrun
from metabolic.engine.policies import DifficultyDropout, FullData, InfoBatch, PriceThreshold
from metabolic.engine.evaluate import frozen_running_stats


def test_screen_rule_is_the_difficulty_rule_outside_revision_epochs():
    prob = torch.tensor([0.1, 0.5, 0.79, 0.8, 0.99])
    correct = torch.tensor([False, True, True, False, True])
    rule = DifficultyDropout(0.8, revision_epochs=1).screen_rule(epoch=0, num_epochs=3)
    assert rule(prob, correct).tolist() == [True, True, True, False, False]
    lazy = DifficultyDropout(0.0).screen_rule(epoch=0, num_epochs=3)
    assert lazy(prob, correct).tolist() == [True, False, False, True, False]  # misclassified only
    assert DifficultyDropout(0.8, revision_epochs=1).screen_rule(epoch=2, num_epochs=3) is None
    assert FullData().screen_rule(0, 3) is None and InfoBatch(0.5, 0.875).screen_rule(0, 3) is None


def test_price_screen_rule_reads_the_current_price_on_either_proxy():
    prob = torch.tensor([0.05, 0.3, 0.6, 0.95])
    gap = PriceThreshold(0.5)
    assert gap.screen_rule(0, 2)(prob, None).tolist() == [True, True, False, False]  # 1 - p > 0.5
    gap.price = 0.9  # the controller moved it
    assert gap.screen_rule(0, 2)(prob, None).tolist() == [True, False, False, False]
    loss = PriceThreshold(1.0, proxy="loss")  # loss = -log p > 1  <=>  p < 0.368
    assert loss.screen_rule(0, 2)(prob, None).tolist() == [True, True, False, False]


def test_frozen_running_stats_leave_batchnorm_statistics_unchanged():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4, momentum=None))
    net.train()
    net(torch.randn(8, 1, 6, 6))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 1, 6, 6) * 3 + 1
    with frozen_running_stats(net):
        with torch.no_grad():
            out = net(x)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running statistics moved"
    assert net[1].momentum == 0.1 and net[2].momentum is None
    # The forward used the batch's own statistics (train mode), not the running ones.
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    net(x)  # outside the context the statistics move again
    assert not torch.equal(before["1.running_mean"], net.state_dict()["1.running_mean"])


@pytest.mark.parametrize("accum", [1, 2])
def test_screen_that_keeps_everything_trains_exactly_as_without(tmp_path, fmnist, accum):
    """tau = 1 keeps every sample: the same weights, scores and metrics, plus one counted forward per sample."""
    args = [*SMALL, "train.epochs=2", "data.policy=pdd_difficulty", "data.tau=1.0", f"train.grad_accum={accum}"]
    plain, screened = tmp_path / "plain", tmp_path / "screened"
    ok(metabolic("train", str(CONFIG), f"output_dir={plain}", *args))
    ok(metabolic("train", str(CONFIG), f"output_dir={screened}", *args, "data.screen=true"))
    a, b = summary(plain), summary(screened)
    assert b["data/samples_backward"] == a["data/samples_backward"] == a["data/samples_forward"]
    assert b["data/samples_forward"] == 2 * b["data/samples_backward"]
    per_sample = b["compute/forward_flops_per_sample"]
    assert b["compute/flops"] == pytest.approx(per_sample * 4 * b["data/samples_backward"])
    differ = {"data/samples_forward", "compute/flops", "config"}
    strip = lambda s: {k: v for k, v in comparable(s).items() if k not in differ and not k.startswith("throughput/")}
    assert strip(a) == strip(b)


def test_screen_on_two_ranks_trains_on_fewer_samples_and_counts_every_forward(tmp_path, fmnist):
    """Under ZeRO-3 (parameters gathered for every forward): ranks keep different counts per batch."""
    out = tmp_path / "run"
    ok(torchrun(2, "-m", "metabolic", "train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=3",
                "deepspeed.zero_stage=3", "data.policy=pdd_difficulty", "data.tau=0.3", "data.screen=true",
                "data.refresh=false", timeout=300))
    s = summary(out)
    n = s["dataset_size"]
    planned = sum(e["micro_batches_per_rank"] for e in s["epochs"]) * 2 * 32  # shards padded to whole steps
    assert s["step"] == sum(e["micro_batches_per_rank"] for e in s["epochs"])  # one step per planned batch
    assert 0 < s["data/samples_backward"] < planned  # the screen dropped samples the plan kept
    assert s["data/samples_forward"] == planned + s["data/samples_backward"]
    assert s["epochs"][0]["num_active"] == n
    evals = [r for r in records(out) if "eval/accuracy" in r]
    assert len(evals) == 3 and all(r["data/samples_backward"] > 0 for r in evals)


def test_screened_run_resumed_mid_epoch_equals_uninterrupted(tmp_path, fmnist):
    """The screen's decisions depend only on the weights and the batch: a run cut by SIGUSR1 in
    its second epoch and resumed ends with the same summary."""
    args = [str(CONFIG), *SMALL, "train.epochs=2", "train.checkpoint_every=2", "data.policy=pdd_difficulty",
            "data.tau=0.4", "data.screen=true"]
    full = tmp_path / "full"
    ok(metabolic("train", *args, f"output_dir={full}"))
    s_full = summary(full)
    first = s_full["epochs"][0]["micro_batches_per_rank"]
    assert s_full["data/samples_backward"] < 2 * s_full["dataset_size"]
    cut = tmp_path / "cut"
    stop_at_step(args, cut, first + 2)
    assert first < records(cut)[-1]["step"] < s_full["step"]
    ok(metabolic("train", *args, f"output_dir={cut}", "resume=true"))
    assert comparable(summary(cut)) == comparable(s_full)
