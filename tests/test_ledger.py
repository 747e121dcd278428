"""The energy ledger against weight snapshots taken by the test, and M >= M_min."""

import os
import shutil

import pytest
import torch

from metabolic.engine.ledger import EnergyLedger, energy_of
from metabolic.kernels import native


def _train(alpha: float, steps: int = 12, optimizer: str = "adamw"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = (torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    numel = sum(p.numel() for p in model.parameters())
    ledger = EnergyLedger(alpha, numel, rank=0, world_size=1)
    ledger.attach(opt)
    w0 = [p.detach().clone() for p in model.parameters()]
    expected, changed = 0.0, 0
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    for step in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 3:  # a step where some weights do not move at all
            model[0].weight.grad[:4] = 0
        opt.step()
        for b, p in zip(before, model.parameters()):
            dw = (p.detach() - b).double()
            expected += float((dw.abs() ** alpha)[dw != 0].sum()) if alpha > 0 else float((dw != 0).sum())
            changed += int((dw != 0).sum())
    m_min = 0.0
    for a, p in zip(w0, model.parameters()):
        d = (p.detach() - a).double()
        m_min += float((d.abs() ** alpha)[d != 0].sum()) if alpha > 0 else float((d != 0).sum())
    return ledger.reduce(), expected, changed, m_min


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("path", ["native", "torch"])
def test_ledger_matches_snapshots_and_bounds_min(monkeypatch, alpha, optimizer, path):
    # native: the C one-pass diff on CPU; torch: what runs elsewhere (GPU, no compiler, bf16)
    if path == "torch":
        monkeypatch.setattr(native, "diff_energy", lambda *a: None)
    elif shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on PATH: only the torch path runs")
    got, expected, changed, m_min = _train(alpha, optimizer=optimizer)
    assert got["energy/metabolic"] == pytest.approx(expected, rel=1e-6)
    assert got["energy/changed_weights"] == changed
    assert got["energy/metabolic_min"] == pytest.approx(m_min, rel=1e-6)
    # Subadditivity of |.|^alpha for alpha in [0, 1]: the path costs at least the displacement.
    assert got["energy/metabolic"] >= got["energy/metabolic_min"] > 0


def test_energy_of_zero_costs_nothing():
    dw = torch.tensor([0.0, 0.5, -2.0, 0.0])
    assert float(energy_of(dw, 0.0)) == 2.0
    assert float(energy_of(dw, 1.0)) == 2.5
    assert float(energy_of(dw, 0.5)) == pytest.approx(0.5 ** 0.5 + 2 ** 0.5)


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler on PATH")
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_native_diff_energy_matches_float64_on_a_large_buffer(monkeypatch, alpha):
    # 1M elements, 30% changed, split across threads: float32 chunk sums stay within 1e-6
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1_000_003, generator=gen)
    b = a.clone()
    idx = torch.randperm(a.numel(), generator=gen)[:300_000]
    b[idx] += 1e-3 * torch.randn(300_000, generator=gen)
    d = (a.double() - b.double())
    ref = float((d.abs() ** alpha)[d != 0].sum()) if alpha > 0 else float((d != 0).sum())
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        e, c = native.diff_energy(a, b, alpha)
        results.append((float(e), int(c)))
        assert float(e) == pytest.approx(ref, rel=1e-6) and int(c) == int(((a - b) != 0).sum())
    assert results[0] == results[1]  # independent of the thread count
    assert native.diff_energy(a.double(), b.double(), alpha) is None  # not fp32: torch path


def test_replica_chunks_partition_the_weights():
    """Under replication each of W ranks counts one contiguous chunk; the chunks tile the tensor."""
    p = torch.arange(10, dtype=torch.float32)
    seen = []
    for rank in range(3):
        ledger = EnergyLedger(1.0, 10, rank=rank, world_size=3)
        ledger.replicated = True
        seen.append(ledger._chunk(p))
    assert torch.equal(torch.cat(seen), p)


class _Counter:
    """A meter whose reading the test sets (joules since the meter was built)."""

    def __init__(self) -> None:
        self.now = 0.0

    def read(self) -> float:
        return self.now


def test_joules_continue_across_a_resume():
    meter = _Counter()
    before = EnergyLedger(1.0, 10, rank=0, world_size=1, joules=meter)
    meter.now = 200.0
    assert before.reduce()["energy/joules"] == 200.0
    state = before.state_dict()
    fresh = _Counter()  # the resumed process builds a new meter, which counts from zero again
    after = EnergyLedger(1.0, 10, rank=0, world_size=1, joules=fresh)
    after.load_state_dict(state)
    fresh.now = 50.0
    assert after.reduce()["energy/joules"] == 250.0


def test_rapl_reader_sums_packages_once_and_survives_a_counter_wrap(tmp_path):
    from metabolic.engine.joules import JouleMeter

    def zone(name, energy_uj, wrap_uj=1_000_000):
        (tmp_path / name).mkdir()
        (tmp_path / name / "energy_uj").write_text(f"{energy_uj}\n")
        (tmp_path / name / "max_energy_range_uj").write_text(f"{wrap_uj}\n")

    zone("intel-rapl:0", 900_000)
    zone("intel-rapl:1", 100_000)
    zone("intel-rapl:0:0", 5)  # a sub-zone of package 0: already inside its count
    read = JouleMeter._rapl(str(tmp_path))
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("200000\n")  # wrapped: 900000 -> 1e6 -> 200000
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("600000\n")
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("999999\n")
    assert read() == pytest.approx(0.3 + 0.5)  # joules: (100000 + 200000) uJ and 500000 uJ
    assert JouleMeter._rapl(str(tmp_path / "none")) is None
