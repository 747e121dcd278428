"""MaskedAdamW / MaskedSGD as torch optimizers."""

import copy

import pytest
import torch

from metabolic.kernels import SELECT_RULES, MaskedAdamW, MaskedSGD


def params(seed=0, shapes=((37, 11), (11,), (5, 3, 2))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def set_grads(ps, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)


def step_together(opt, ref, a, b, steps: int = 6, check_every_step: bool = False) -> None:
    """Step both optimizers on the same gradients; their parameters must agree to 1e-6."""
    for step in range(steps):
        set_grads(a, step)
        set_grads(b, step)
        opt.step()
        ref.step()
        if check_every_step or step == steps - 1:
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dense_adamw_matches_torch_adamw(backend):
    a, b = params(), params()
    opt = MaskedAdamW(a, lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(b, lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    step_together(opt, ref, a, b, check_every_step=True)
    assert opt.last_energy["fraction"] == 1.0


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_dense_sgd_matches_torch_sgd(nesterov, dampening):
    a, b = params(), params()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov, dampening=dampening)
    opt, ref = MaskedSGD(a, **kw), torch.optim.SGD(b, **kw)
    step_together(opt, ref, a, b)


def test_plain_sgd_without_momentum_has_no_buffer():
    a, b = params(), params()
    opt, ref = MaskedSGD(a, lr=0.1), torch.optim.SGD(b, lr=0.1)
    set_grads(a, 0)
    set_grads(b, 0)
    opt.step()
    ref.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert all("momentum_buffer" not in opt.state[p] for p in a)


@pytest.mark.parametrize("rule", SELECT_RULES)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_last_energy_equals_snapshot_difference(rule, alpha):
    ps = params(shapes=((300, 200), (200,)))
    opt = MaskedAdamW(ps, lr=1e-3, weight_decay=0.01, select=rule, fraction=0.1, price=1e-4,
                      alpha=alpha, block_size=1000)
    for step in range(3):
        set_grads(ps, step)
        before = [p.detach().clone() for p in ps]
        opt.step()
        d = torch.cat([(p.detach() - b).flatten() for p, b in zip(ps, before)])
        nz = d != 0
        expected = float(nz.sum()) if alpha == 0 else float(d.abs().double().sum())
        assert opt.last_energy["changed"] == int(nz.sum())
        assert opt.last_energy["metabolic"] == pytest.approx(expected, rel=1e-5)
        assert opt.last_energy["numel"] == 60_200
        assert opt.last_energy["fraction"] == pytest.approx(int(nz.sum()) / 60_200)


@pytest.mark.parametrize("rule", ["topk", "random", "block"])
def test_achieved_fraction_near_target(rule):
    ps = [torch.nn.Parameter(torch.randn(400_000))]
    opt = MaskedSGD(ps, lr=0.01, momentum=0.9, select=rule, fraction=0.1, block_size=256)
    for step in range(2):
        set_grads(ps, step)
        opt.step()
        assert abs(opt.last_energy["fraction"] - 0.1) < 0.005 + (256 / 400_000 if rule == "block" else 0.0)


def test_price_and_fraction_are_read_from_param_groups_each_step():
    ps = [torch.nn.Parameter(torch.randn(50_000))]
    opt = MaskedAdamW(ps, lr=1e-3, select="soft", price=0.0)
    set_grads(ps, 0)
    opt.step()
    dense_fraction = opt.last_energy["fraction"]
    for g in opt.param_groups:
        g["price"] = 1.0
    set_grads(ps, 1)
    opt.step()
    assert opt.last_energy["fraction"] < 0.5 * dense_fraction
    for g in opt.param_groups:
        g["select"], g["fraction"] = "topk", 0.3
    set_grads(ps, 2)
    opt.step()
    assert abs(opt.last_energy["fraction"] - 0.3) < 0.02
    for g in opt.param_groups:
        g["price"] = -1.0
    with pytest.raises(ValueError, match="price"):
        opt.step()


def test_residual_state_dict_round_trip():
    a = params()
    opt = MaskedAdamW(a, lr=1e-2, select="topk", fraction=0.2, residual=True)
    for step in range(3):
        set_grads(a, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt2 = MaskedAdamW(b, lr=1e-2, select="topk", fraction=0.2, residual=True)
    opt2.load_state_dict(saved)
    st = opt2.state[b[0]]
    assert st["step"] == 3 and st["residual"].abs().sum() > 0
    for step in range(3, 5):
        set_grads(a, step)
        set_grads(b, step)
        opt.step()
        opt2.step()
        assert opt2.last_energy == opt.last_energy
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bf16_copy_follows_fp32_params():
    ps = params()
    opt = MaskedAdamW(ps, lr=1e-2, select="random", fraction=0.5)
    copies = [torch.empty(p.shape, dtype=torch.bfloat16) for p in ps]
    for p, c in zip(ps, copies):
        opt.attach_bf16_copy(p, c)
    set_grads(ps, 0)
    opt.step()
    for p, c in zip(ps, copies):
        assert torch.equal(c, p.detach().to(torch.bfloat16))
    with pytest.raises(ValueError):
        opt.attach_bf16_copy(ps[0], torch.empty(3, dtype=torch.bfloat16))


def test_state_is_lazy_and_survives_param_swap():
    # DeepSpeed replaces group params with flat partitions after construction
    ps = params()
    opt = MaskedAdamW(ps, lr=1e-2)
    assert len(opt.state) == 0
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in ps]))
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn(flat.shape)
    opt.step()
    assert opt.state[flat]["exp_avg"].shape == flat.shape
    assert opt.last_energy["numel"] == flat.numel()


def test_non_contiguous_param_is_updated():
    base = torch.randn(20, 30)
    p = torch.nn.Parameter(base.t())  # non-contiguous view
    q = torch.nn.Parameter(base.t().contiguous())
    opt, ref = MaskedAdamW([p], lr=1e-2), torch.optim.AdamW([q], lr=1e-2, weight_decay=0.0)
    g = torch.randn(30, 20)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(select="nope"), "select"),
    (dict(fraction=0.0), "fraction"),
    (dict(fraction=1.5), "fraction"),
    (dict(price=-1.0), "price"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(block_size=0), "block_size"),
    (dict(lr=-1.0), "lr"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(backend="cuda"), "backend"),
    (dict(residual="yes"), "residual"),
    (dict(seed=1.5), "seed"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    for cls in (MaskedAdamW, MaskedSGD):
        with pytest.raises(ValueError, match=name):
            cls(params(), **kwargs)


def test_invalid_optimizer_specific_arguments():
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW(params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        MaskedAdamW(params(), eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        MaskedSGD(params(), momentum=-0.1)
    with pytest.raises(ValueError, match="nesterov"):
        MaskedSGD(params(), nesterov=True)


def test_non_fp32_param_is_rejected():
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    p.grad = torch.randn(10, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="fp32"):
        MaskedAdamW([p]).step()


def test_dense_1d_updates_vectors_densely_and_selects_matrices():
    from helpers import CONFIG
    from metabolic.engine.build import build_optimizer
    from metabolic.engine.config import load_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 10))
    cfg = load_config(CONFIG, ["optimizer.name=masked_adamw", "optimizer.select=soft", "optimizer.price=1e-3",
                               "optimizer.count_price=1e-6", "optimizer.residual=true", "optimizer.dense_1d=true"])
    opt = build_optimizer(cfg, model.parameters())
    masked, dense = opt.param_groups
    assert [p.dim() for p in masked["params"]] == [2, 2] and all(p.dim() == 1 for p in dense["params"])
    assert dense["select"] == "dense" and dense["count_price"] == 0.0 and not dense["residual"]
    assert masked["select"] == "soft" and masked["count_price"] == 1e-6 and masked["residual"]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(32, 64)).logsumexp(dim=1).mean().backward()
    opt.step()
    changed = [float((p.detach() != b).float().mean()) for p, b in zip(model.parameters(), before)]
    vec = [c for c, p in zip(changed, model.parameters()) if p.dim() == 1]
    mat = [c for c, p in zip(changed, model.parameters()) if p.dim() == 2]
    assert all(c == 1.0 for c in vec)  # every bias and norm scale moved
    assert all(c < 1.0 for c in mat)  # the matrices kept their price
