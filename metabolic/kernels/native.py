"""Native CPU backend: `cpu_step.c`, built with the system C compiler on first use, called via ctypes.

The build is cached per (source, flags, compiler, CPU features) under $METABOLIC_CACHE (default
~/.cache/metabolic), so nodes with different CPUs sharing a home directory never load code built
for another instruction set. Ranks building at once each write a temporary file and rename it
into place. Without a compiler, or when the build fails, `available()` is False, the reason is
logged once, and the "auto" backend uses the torch fallback. METABOLIC_NATIVE=0 disables it.

Built with -fopenmp, the library needs libgomp.so.1; torch (imported first) has already loaded
its own copy under that soname, so both share one OpenMP runtime and one pool of worker threads.
A large buffer runs on torch.get_num_threads() threads. Where -fopenmp does not build, the step
runs on one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .fallback import _hp
from .spec import StepSpec, hash_base
from .threshold import block_threshold, num_blocks, sample_indices, topk_threshold

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_step.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd",
         "-fPIC", "-shared"]
OPENMP = ["-fopenmp"]
THREAD_MIN_NUMEL = 1 << 18  # below this one thread beats waking the others
_RULES = {"dense": 0, "topk": 1, "hard": 2, "soft": 3, "random": 4, "block": 5}

_lib: ctypes.CDLL | None = None
_error: str | None = None


class _Step(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("v", ctypes.c_void_p), ("r", ctypes.c_void_p), ("pbf", ctypes.c_void_p),
                ("hp", ctypes.c_void_p), ("block_keep", ctypes.c_void_p),
                ("block_size", ctypes.c_int64),
                ("threshold", ctypes.c_float), ("hash_base", ctypes.c_uint32),
                ("random_threshold", ctypes.c_int64), ("alpha", ctypes.c_float),
                ("threads", ctypes.c_int32)]


def _cpu_fingerprint() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    """The cached library, built now if missing: with OpenMP if the toolchain has it."""
    try:
        return _build_with(cc, FLAGS + OPENMP)
    except RuntimeError as exc:
        log.info("native CPU step: building without OpenMP (one thread): %s", exc)
        return _build_with(cc, FLAGS)


def _build_with(cc: str, flags: list[str]) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), cc, version,
                                    _cpu_fingerprint()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("METABOLIC_CACHE", Path.home() / ".cache" / "metabolic"))
    lib = cache / f"cpu_step-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    log.info("building the native CPU masked step (first use, a few seconds): %s", lib)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)  # atomic: a rank building at the same time never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    try:
        if os.environ.get("METABOLIC_NATIVE", "1") == "0":
            raise RuntimeError("disabled by METABOLIC_NATIVE=0")
        cc = os.environ.get("CC", "cc")
        if shutil.which(cc) is None:
            raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
        lib = ctypes.CDLL(str(_build(cc)))
        args = [ctypes.POINTER(_Step), ctypes.c_int64] + [ctypes.c_int] * 4
        lib.masked_step.argtypes = args + [ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                                           ctypes.POINTER(ctypes.c_int64)]
        lib.block_sq_norms.argtypes = args + [ctypes.c_void_p]
        lib.sample_abs_u.argtypes = [ctypes.POINTER(_Step), ctypes.c_void_p, ctypes.c_int64] + \
            [ctypes.c_int] * 4 + [ctypes.c_void_p]
        lib.diff_energy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                    ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                                    ctypes.POINTER(ctypes.c_int64)]
        for fn in (lib.masked_step, lib.block_sq_norms, lib.sample_abs_u, lib.diff_energy):
            fn.restype = ctypes.c_int
        _lib = lib
    except Exception as exc:  # no toolchain must not stop training: the torch path works
        _error = str(exc)
        log.warning("native CPU masked step unavailable, using the torch fallback: %s", exc)
    return _lib


def available() -> bool:
    """True when the native library is built (or builds now) and loads."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def _threads(n: int) -> int:
    """OpenMP threads for a buffer of n elements: torch's count, or one for small buffers."""
    return torch.get_num_threads() if n >= THREAD_MIN_NUMEL else 1


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def native_step(p: torch.Tensor, g: torch.Tensor, state: dict, spec: StepSpec,
                out_bf16: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked step on flat fp32 CPU `p` in place; returns 0-d (energy float64, changed int64)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native CPU masked step unavailable: {_error}")
    g = g.float().contiguous()
    n = p.numel()
    has_m = spec.kind == "adamw" or spec.momentum != 0.0
    m = state.get("exp_avg", state.get("momentum_buffer")) if has_m else None
    v = state.get("exp_avg_sq")
    r = state.get("residual") if spec.residual else None
    for name, t in (("param", p), ("exp_avg", m), ("exp_avg_sq", v), ("residual", r)):
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"native step needs contiguous fp32 CPU tensors; {name} is not")
    if out_bf16 is not None and (out_bf16.dtype != torch.bfloat16 or not out_bf16.is_contiguous()
                                 or out_bf16.numel() != n or out_bf16.device.type != "cpu"):
        raise ValueError("native step: out_bf16 must be a contiguous bf16 CPU tensor of p's size")
    hp = _hp(spec, p.device)
    flags = (0 if spec.kind == "adamw" else 1, int(has_m), int(spec.nesterov), int(spec.residual))
    base = dict(p=_ptr(p), g=_ptr(g), m=_ptr(m), v=_ptr(v), r=_ptr(r), pbf=_ptr(out_bf16),
                hp=_ptr(hp), block_size=spec.block_size, alpha=spec.alpha,
                hash_base=hash_base(spec.seed, spec.step, spec.salt),
                random_threshold=spec.random_threshold,
                threads=_threads(n))
    if spec.select == "topk":
        idx = sample_indices(n, spec.seed, spec.step, spec.salt, p.device)
        u_abs = torch.empty(idx.numel(), dtype=torch.float32)
        lib.sample_abs_u(ctypes.byref(_Step(**base)), idx.data_ptr(), idx.numel(), *flags,
                         u_abs.data_ptr())
        base["threshold"] = float(topk_threshold(u_abs, spec.fraction))
    elif spec.select == "block":
        sq = torch.empty(num_blocks(n, spec.block_size), dtype=torch.float32)
        lib.block_sq_norms(ctypes.byref(_Step(**base)), n, *flags, sq.data_ptr())
        keep = (sq > block_threshold(sq, spec.fraction)).to(torch.uint8)  # alive until the step
        base["block_keep"] = keep.data_ptr()
    e, c = ctypes.c_double(), ctypes.c_int64()
    err = lib.masked_step(ctypes.byref(_Step(**base)), n, *flags, _RULES[spec.select],
                          ctypes.byref(e), ctypes.byref(c))
    if err:
        raise RuntimeError(f"native masked step failed ({'out of memory' if err == 2 else 'bad rule'})")
    return torch.tensor(e.value, dtype=torch.float64), torch.tensor(c.value, dtype=torch.int64)


def diff_energy(after: torch.Tensor, before: torch.Tensor, alpha: float
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sum |after - before|^alpha float64, count of after != before int64) in one pass, or None
    when the library is unavailable or the tensors are not contiguous fp32 CPU tensors of one size."""
    if (after.numel() != before.numel()
            or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
                   for t in (after, before))
            or _load() is None):  # checked last: a GPU run never builds the library
        return None
    n = after.numel()
    e, c = ctypes.c_double(), ctypes.c_int64()
    if _lib.diff_energy(after.data_ptr(), before.data_ptr(), n, alpha, _threads(n), ctypes.byref(e), ctypes.byref(c)):
        raise RuntimeError("native diff_energy: out of memory")
    return torch.tensor(e.value, dtype=torch.float64), torch.tensor(c.value, dtype=torch.int64)
