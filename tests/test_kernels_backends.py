"""Torch fallback (eager and compiled), native CPU step and Triton kernel (interpreted on CPU,
compiled on CUDA) against the reference step."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import (CASES, COUNT_PRICE, COUNT_PRICE_CASES, DECAY_CASES, RULES, case_key, make_case,
                          make_spec)

from metabolic.kernels.fallback import fallback_step
from metabolic.kernels.reference import reference_step

ROOT = Path(__file__).resolve().parents[1]


def compare(step_fn, kind, rule, alpha, residual, n=70_001, device="cpu", decay=1.0, count_price=0.0,
            **step_kw):
    spec = make_spec(kind, rule, alpha, residual, residual_decay=decay, count_price=count_price)
    p, g, st = make_case(kind, residual, n)
    p2, g2, st2 = make_case(kind, residual, n, device=device)
    e1, c1 = reference_step(p, g, st, spec)
    e2, c2 = step_fn(p2, g2, st2, spec, **step_kw)
    torch.testing.assert_close(p2.cpu(), p, atol=1e-6, rtol=1e-5)
    for k in st:
        torch.testing.assert_close(st2[k].cpu(), st[k], atol=1e-7, rtol=1e-5)
    assert int(c2) == c1
    assert float(e2) == pytest.approx(e1, rel=1e-5)


@pytest.mark.parametrize("kind,rule,alpha,residual", CASES)
def test_fallback_eager_matches_reference(kind, rule, alpha, residual):
    compare(fallback_step, kind, rule, alpha, residual, compile=False)


@pytest.mark.parametrize("kind,rule", DECAY_CASES)
def test_fallback_eager_fading_residual_matches_reference(kind, rule):
    compare(fallback_step, kind, rule, 1.0, True, decay=0.5, compile=False)


@pytest.mark.parametrize("kind,residual,decay", COUNT_PRICE_CASES)
def test_fallback_eager_count_price_matches_reference(kind, residual, decay):
    compare(fallback_step, kind, "soft", 1.0, residual, decay=decay, count_price=COUNT_PRICE, compile=False)


def test_fallback_eager_chunking_covers_odd_sizes():
    # more than one eager chunk, block size not dividing the chunk or the buffer
    spec = make_spec("adamw", "block", 1.0, True, block_size=777)
    p, g, st = make_case("adamw", True, 200_003)
    p2, g2, st2 = make_case("adamw", True, 200_003)
    e1, c1 = reference_step(p, g, st, spec)
    e2, c2 = fallback_step(p2, g2, st2, spec, compile=False)
    torch.testing.assert_close(p2, p, atol=1e-6, rtol=1e-5)
    assert int(c2) == c1 and float(e2) == pytest.approx(e1, rel=1e-5)


def test_fallback_compiled_matches_reference():
    # one compiled variant (random rule exercises the integer hash inside the compiled loop);
    # compile=True even though the tensor is small, to test the compiled code path itself
    compare(fallback_step, "adamw", "random", 1.0, True, compile=True)


def test_fallback_energy_compile_failure_applies_the_step_once(monkeypatch):
    # The compiled step writes p before its energy pass; if only that pass fails to compile,
    # the energy is computed eagerly and the step is not run a second time.
    from metabolic.kernels import fallback

    def compiled(name):
        if name == "energy":
            def broken(*args, **kwargs):
                raise RuntimeError("simulated compile failure")
            return broken
        return fallback._FUNCTIONS[name]

    monkeypatch.setattr(fallback, "_get_compiled", compiled)
    monkeypatch.setattr(fallback, "_compile_broken", False)
    compare(fallback_step, "adamw", "topk", 1.0, True, compile=True)
    assert fallback._compile_broken  # later steps go eager


@pytest.mark.parametrize("rule", ["block", "topk", "dense"])
def test_fallback_steps_an_empty_tensor(rule):
    spec = make_spec("adamw", rule, 1.0, True)
    p, g, st = make_case("adamw", True, 0)
    e, c = fallback_step(p, g, st, spec, compile=False)
    assert float(e) == 0.0 and int(c) == 0


def test_fallback_bf16_copy_is_rounded_copy_of_new_params():
    spec = make_spec("adamw", "topk", 1.0, False)
    p, g, st = make_case("adamw", False, 10_000)
    out = torch.empty(10_000, dtype=torch.bfloat16)
    fallback_step(p, g, st, spec, out_bf16=out, compile=False)
    assert torch.equal(out, p.to(torch.bfloat16))


def _no_compiler() -> bool:
    return shutil.which(os.environ.get("CC", "cc")) is None


# A machine without a C compiler runs the torch fallback (tested below). Where a compiler
# exists the step must build: a build failure fails these tests instead of skipping them.
needs_native = pytest.mark.skipif(_no_compiler(), reason="no C compiler on PATH: the torch fallback runs")


@needs_native
def test_native_step_builds_where_a_compiler_exists():
    from metabolic.kernels import native
    assert native.available(), native.unavailable_reason()


@needs_native
@pytest.mark.parametrize("kind,rule,alpha,residual", CASES)
def test_native_matches_reference(kind, rule, alpha, residual):
    from metabolic.kernels.native import native_step
    compare(native_step, kind, rule, alpha, residual)


@needs_native
@pytest.mark.parametrize("kind,rule", DECAY_CASES)
def test_native_fading_residual_matches_reference(kind, rule):
    from metabolic.kernels.native import native_step
    compare(native_step, kind, rule, 1.0, True, decay=0.5)


@needs_native
@pytest.mark.parametrize("kind,residual,decay", COUNT_PRICE_CASES)
def test_native_count_price_matches_reference(kind, residual, decay):
    from metabolic.kernels.native import native_step
    compare(native_step, kind, "soft", 1.0, residual, decay=decay, count_price=COUNT_PRICE)


@needs_native
@pytest.mark.parametrize("rule", ["topk", "block", "soft"])
def test_native_result_does_not_depend_on_thread_count(monkeypatch, rule):
    from metabolic.kernels import native
    monkeypatch.setattr(native, "THREAD_MIN_NUMEL", 1)
    spec = make_spec("adamw", rule, 1.0, True, block_size=777)
    runs = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        p, g, st = make_case("adamw", True, 200_003)
        e, c = native.native_step(p, g, st, spec)
        runs.append((p, st["residual"], float(e), int(c)))
    (p1, r1, e1, c1), (p3, r3, e3, c3) = runs
    assert torch.equal(p1, p3) and torch.equal(r1, r3) and c1 == c3 and e1 == e3


@needs_native
def test_native_without_openmp_builds_single_threaded(monkeypatch, tmp_path):
    # a toolchain without OpenMP: the build drops -fopenmp and the step still matches
    from metabolic.kernels import native
    monkeypatch.setattr(native, "OPENMP", ["-fno-such-openmp-flag"])
    monkeypatch.setenv("METABOLIC_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    assert native.available(), native.unavailable_reason()
    assert len(list(tmp_path.glob("cpu_step-*.so"))) == 1
    monkeypatch.setattr(native, "THREAD_MIN_NUMEL", 1)
    compare(native.native_step, "adamw", "block", 1.0, True)


@needs_native
def test_native_bf16_copy_is_rounded_copy_of_new_params():
    from metabolic.kernels.native import native_step
    spec = make_spec("adamw", "hard", 1.0, False)
    p, g, st = make_case("adamw", False, 10_000)
    p[:4] = torch.tensor([1.00390625, 1.01171875, -3.0e38, 1e-40])  # ties to even, huge, subnormal
    out = torch.empty(10_000, dtype=torch.bfloat16)
    native_step(p, g, st, spec, out_bf16=out)
    assert torch.equal(out, p.to(torch.bfloat16))


@pytest.mark.parametrize("cc,reason", [("no-such-compiler", "no C compiler"), ("false", "failed")])
def test_optimizer_without_native_build_uses_torch_fallback(tmp_path, cc, reason):
    # a fresh cache and a compiler that is missing or fails: training goes on, the reason is logged
    code = ("import torch; from metabolic.kernels import MaskedSGD, native\n"
            "torch.manual_seed(0); p = torch.nn.Parameter(torch.ones(100)); p.grad = torch.randn(100)\n"
            "opt = MaskedSGD([p], lr=0.1, select='topk', fraction=0.5); opt.step()\n"
            "print(native.available(), opt.last_energy['changed'], native.unavailable_reason())")
    env = dict(os.environ, CC=cc, METABOLIC_CACHE=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("METABOLIC_NATIVE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    available, changed, why = proc.stdout.split(maxsplit=2)
    assert available == "False" and int(changed) == 50 and reason in why
    assert "using the torch fallback" in proc.stderr
    assert not list(tmp_path.glob("*.so"))  # no half-built library left behind


@needs_native
def test_ranks_building_at_once_share_one_library(tmp_path):
    # two processes with an empty cache build at the same moment: both load, one file remains
    code = "from metabolic.kernels import native; assert native.available(), native.unavailable_reason()"
    env = dict(os.environ, METABOLIC_CACHE=str(tmp_path), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.glob("cpu_step-*.so")).name]


@pytest.fixture(scope="module")
def interpreted_triton():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/workers/triton_interpret_check.py")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind,rule,alpha,residual", CASES)
def test_interpreted_triton_matches_reference(interpreted_triton, kind, rule, alpha, residual):
    r = interpreted_triton[case_key(kind, rule, alpha, residual)]
    assert r["p_err"] <= 1e-6
    assert r["state_err"] <= 1e-6
    assert r["changed"] == r["changed_ref"]
    assert r["energy"] == pytest.approx(r["energy_ref"], rel=1e-5)
    # the interpreter truncates fp32->bf16 where GPUs round to nearest even: 1 ulp allowed
    assert r["bf16_ulps"] <= 1


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_interpreted_triton_topk_samples_wide_strata_like_reference(interpreted_triton, kind):
    # 1M elements: ~61 positions per stratum, so the kernel's in-kernel sample hash is checked
    r = interpreted_triton[f"{case_key(kind, 'topk', 1.0, False)}_n1000003"]
    assert r["changed"] == r["changed_ref"]
    assert 0.09 < r["changed"] / 1_000_003 < 0.11
    assert r["p_err"] <= 1e-6 and r["state_err"] <= 1e-6


@pytest.mark.parametrize("kind,rule", DECAY_CASES)
def test_interpreted_triton_fading_residual_matches_reference(interpreted_triton, kind, rule):
    r = interpreted_triton[case_key(kind, rule, 1.0, True, 0.5)]
    assert r["p_err"] <= 1e-6 and r["state_err"] <= 1e-6
    assert r["changed"] == r["changed_ref"]
    assert r["energy"] == pytest.approx(r["energy_ref"], rel=1e-5)


@pytest.mark.parametrize("kind,residual,decay", COUNT_PRICE_CASES)
def test_interpreted_triton_count_price_matches_reference(interpreted_triton, kind, residual, decay):
    r = interpreted_triton[case_key(kind, "soft", 1.0, residual, decay, COUNT_PRICE)]
    assert r["p_err"] <= 1e-6 and r["state_err"] <= 1e-6
    assert r["changed"] == r["changed_ref"]
    assert r["energy"] == pytest.approx(r["energy_ref"], rel=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind,rule,alpha,residual", CASES)
def test_cuda_triton_matches_reference(kind, rule, alpha, residual):
    from metabolic.kernels.triton_step import triton_step
    compare(triton_step, kind, rule, alpha, residual, n=1_000_003, device="cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind,rule", DECAY_CASES)
def test_cuda_triton_fading_residual_matches_reference(kind, rule):
    from metabolic.kernels.triton_step import triton_step
    compare(triton_step, kind, rule, 1.0, True, n=1_000_003, device="cuda", decay=0.5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind,residual,decay", COUNT_PRICE_CASES)
def test_cuda_triton_count_price_matches_reference(kind, residual, decay):
    from metabolic.kernels.triton_step import triton_step
    compare(triton_step, kind, "soft", 1.0, residual, n=1_000_003, device="cuda", decay=decay,
            count_price=COUNT_PRICE)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rule", RULES)
def test_cuda_triton_bf16_copy(rule):
    from metabolic.kernels.triton_step import triton_step
    spec = make_spec("adamw", rule, 1.0, False)
    p, g, st = make_case("adamw", False, 300_001, device="cuda")
    out = torch.empty(300_001, dtype=torch.bfloat16, device="cuda")
    triton_step(p, g, st, spec, out_bf16=out)
    assert torch.equal(out, p.to(torch.bfloat16))  # GPU casts round to nearest even, as torch


@pytest.mark.gpu
@cuda
def test_cuda_torch_fallback_matches_reference():
    compare(fallback_step, "adamw", "topk", 1.0, True, n=1_000_003, device="cuda", compile=False)


@pytest.mark.gpu
@cuda
def test_cuda_autotune_does_not_corrupt_state():
    # the first call autotunes (runs the kernel several times); restore_value must undo that
    from metabolic.kernels.triton_step import triton_step
    compare(triton_step, "adamw", "soft", 1.0, True, n=3_000_017, device="cuda")
