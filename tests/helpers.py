"""Shared test utilities: run the real CLI and real torchrun processes, each with a timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fmnist_cnn.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
# Small and quick: a few hundred samples, short eval, a log record every step.
SMALL = ["data.limit=384", "data.eval_limit=256", "train.micro_batch_size=32", "train.log_every=1",
         "train.warmup_steps=2", "train.progress=false", "model.width=8"]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "metabolic" / "torch_extensions"))
    e["PYTHONUNBUFFERED"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command; a hang past `timeout` fails the test instead of stalling the suite."""
    try:
        return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{err.stdout}\n{err.stderr}") from err


def metabolic(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "metabolic", *args], timeout=timeout)


def torchrun(nproc: int, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), *args], timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def stop_at_step(args: list[str], out: Path, step: int, timeout: float = 200, sig: int = signal.SIGUSR1) -> None:
    """Run `metabolic train *args output_dir=out`, send `sig` (default SIGUSR1, SLURM's preemption
    signal) once its metrics reach `step`, and require the checkpointed stop's exit code (75)."""
    proc = subprocess.Popen([sys.executable, "-m", "metabolic", "train", *args, f"output_dir={out}"],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + timeout
        while time.time() < end and proc.poll() is None:
            path = Path(out) / "metrics.jsonl"
            if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
                break
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 75, proc.stderr.read()[-3000:]


def stop_when_logged(args: list[str], marker: str, signals: tuple[int, ...] = (signal.SIGUSR1,),
                     timeout: float = 120) -> tuple[int, str]:
    """Run `metabolic train *args`, send `signals` (50 ms apart) once a line of its stderr holds
    `marker` (data preparation, before any checkpoint); (exit code, all of its stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "metabolic", "train", *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if marker in line:
                for sig in signals:
                    proc.send_signal(sig)
                    time.sleep(0.05)
                break
        rest = proc.communicate(timeout=timeout)[1]
    finally:
        proc.kill()
    return proc.returncode, "".join(seen) + rest


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def comparable(s: dict) -> dict:
    """Summary figures that must match between equivalent runs (wall-clock figures excluded)."""
    return {k: v for k, v in s.items() if not k.startswith("time/") and k != "energy/joules"}
