"""Native CPU backend: `cpu_step.c`, built with the system C compiler on first use, called via ctypes.

The build is cached per (source, flags, compiler, CPU features) under $METABOLIC_CACHE (default
~/.cache/metabolic), so nodes with different CPUs sharing a home directory never load code built
for another instruction set. Ranks building at once each write a temporary file and rename it
into place. Without a compiler, or when the build fails, `available()` is False, the reason is
logged once, and the "auto" backend uses the torch fallback. METABOLIC_NATIVE=0 disables it.

ctypes releases the GIL during the call, so a large buffer is split across torch's CPU threads
with a thread pool; splits are SUB-aligned, so the energy does not depend on the split.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .fallback import _hp
from .spec import StepSpec, hash_base
from .threshold import block_threshold, num_blocks, sample_indices, topk_threshold

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_step.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd",
         "-fPIC", "-shared"]
SUB = 4096  # must equal SUB in cpu_step.c
THREAD_MIN_NUMEL = 1 << 18  # below this one thread is faster than handing work to a pool
_RULES = {"dense": 0, "topk": 1, "hard": 2, "soft": 3, "random": 4, "block": 5}

_lib: ctypes.CDLL | None = None
_error: str | None = None
_pool: ThreadPoolExecutor | None = None


class _Step(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("v", ctypes.c_void_p), ("r", ctypes.c_void_p), ("pbf", ctypes.c_void_p),
                ("hp", ctypes.c_void_p), ("block_keep", ctypes.c_void_p),
                ("block_size", ctypes.c_int64), ("offset", ctypes.c_int64),
                ("threshold", ctypes.c_float), ("hash_base", ctypes.c_uint32),
                ("random_threshold", ctypes.c_int64), ("alpha", ctypes.c_float)]


def _cpu_fingerprint() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cc, version,
                                    _cpu_fingerprint()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("METABOLIC_CACHE", Path.home() / ".cache" / "metabolic"))
    lib = cache / f"cpu_step-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
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
        for fn in (lib.masked_step, lib.block_sq_norms, lib.sample_abs_u):
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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _splits(n: int, align: int) -> list[tuple[int, int]]:
    """Contiguous align-multiple ranges, one per torch CPU thread, covering [0, n)."""
    threads = torch.get_num_threads() if n >= THREAD_MIN_NUMEL else 1
    step = -(-n // threads)
    step = -(-step // align) * align
    return [(s, min(s + step, n)) for s in range(0, n, step)] or [(0, 0)]


def _map(fn, ranges: list[tuple[int, int]]) -> list:
    global _pool
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    if _pool is None or _pool._max_workers < len(ranges):
        _pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="metabolic-step")
    return list(_pool.map(lambda r: fn(*r), ranges))


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
    hp = _hp(spec, p.device)
    flags = (0 if spec.kind == "adamw" else 1, int(has_m), int(spec.nesterov), int(spec.residual))
    base = dict(p=_ptr(p), g=_ptr(g), m=_ptr(m), v=_ptr(v), r=_ptr(r), pbf=_ptr(out_bf16),
                hp=_ptr(hp), block_size=spec.block_size, alpha=spec.alpha,
                hash_base=hash_base(spec.seed, spec.step, spec.salt),
                random_threshold=spec.random_threshold)
    keep = None
    align = SUB
    if spec.select == "topk":
        idx = sample_indices(n, spec.seed, spec.step, spec.salt, p.device)
        u_abs = torch.empty(idx.numel(), dtype=torch.float32)
        lib.sample_abs_u(ctypes.byref(_Step(**base)), idx.data_ptr(), idx.numel(), *flags,
                         u_abs.data_ptr())
        base["threshold"] = float(topk_threshold(u_abs, spec.fraction))
    elif spec.select == "block":
        bs = spec.block_size
        align = math.lcm(SUB, bs)  # whole blocks and whole energy sub-chunks per thread
        sq = torch.empty(num_blocks(n, bs), dtype=torch.float32)

        def norms(start: int, stop: int) -> None:
            s = _Step(**_shift(base, start), offset=start)
            lib.block_sq_norms(ctypes.byref(s), stop - start, *flags, sq.data_ptr() + 4 * (start // bs))

        _map(norms, _splits(n, align))
        keep = (sq > block_threshold(sq, spec.fraction)).to(torch.uint8)
        base["block_keep"] = keep.data_ptr()

    def step(start: int, stop: int) -> tuple[float, int]:
        s = _Step(**_shift(base, start), offset=start)
        e, c = ctypes.c_double(), ctypes.c_int64()
        if lib.masked_step(ctypes.byref(s), stop - start, *flags, _RULES[spec.select],
                           ctypes.byref(e), ctypes.byref(c)):
            raise ValueError(f"native step: unknown rule {spec.select!r}")
        return e.value, c.value

    parts = _map(step, _splits(n, align))
    energy = sum(e for e, _ in parts)
    changed = sum(c for _, c in parts)
    return torch.tensor(energy, dtype=torch.float64), torch.tensor(changed, dtype=torch.int64)


_ELEMENT_BYTES = {"p": 4, "g": 4, "m": 4, "v": 4, "r": 4, "pbf": 2}


def _shift(base: dict, start: int) -> dict:
    """Pointers advanced to element `start` (hp and block_keep are indexed globally)."""
    out = dict(base)
    for k, size in _ELEMENT_BYTES.items():
        if out.get(k) is not None:
            out[k] += size * start
    return out
