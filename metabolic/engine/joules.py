"""Measured energy in joules: NVML on NVIDIA GPUs, RAPL on Linux CPUs when readable, else None."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional


class JouleMeter:
    """Reads a monotonically increasing energy counter; `read()` returns joules since construction."""

    def __init__(self, device_index: Optional[int], read_cpu: bool) -> None:
        self._read = None
        self.source = "none"
        if device_index is not None:
            self._read = self._nvml(device_index)
            if self._read:
                self.source = "nvml"
        if self._read is None and read_cpu:
            self._read = self._rapl()
            if self._read:
                self.source = "rapl"
        self._start = self._read() if self._read else None

    @staticmethod
    def _nvml(index: int):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where unsupported
            return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ -> J
        except Exception:
            return None

    @staticmethod
    def _rapl(root: str = "/sys/class/powercap"):
        # Top-level packages only (intel-rapl:N), not their sub-zones, so nothing is counted twice.
        zones = [Path(p) for p in glob.glob(f"{root}/intel-rapl:[0-9]")]
        readable = []
        for z in zones:
            try:
                int((z / "energy_uj").read_text())
                wrap = int((z / "max_energy_range_uj").read_text())
                readable.append((z / "energy_uj", wrap))
            except (OSError, ValueError):
                continue
        if not readable:
            return None
        state = {"last": [int(p.read_text()) for p, _ in readable], "total": 0.0}

        def read() -> float:
            for i, (p, wrap) in enumerate(readable):
                now = int(p.read_text())
                delta = now - state["last"][i]
                state["total"] += (delta + wrap if delta < 0 else delta) / 1e6  # counter wraps
                state["last"][i] = now
            return state["total"]

        return read

    @property
    def available(self) -> bool:
        return self._read is not None

    def read(self) -> Optional[float]:
        """Joules since construction, or None where no counter is readable."""
        if self._read is None:
            return None
        return self._read() - self._start
