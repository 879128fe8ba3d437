"""Facts about the machine a benchmark ran on, and readers for memory and power where the OS exposes them."""

from __future__ import annotations

import glob
import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any

import psutil


def _gpu_name() -> str | None:
    """The Jetson's board name, else the GPU name as the engine builder sees it (one detector)."""
    if Path("/etc/nv_tegra_release").exists():
        model = Path("/proc/device-tree/model")
        return model.read_text(errors="ignore").strip("\x00\n ") if model.exists() else "NVIDIA Jetson"
    from omniedge.export.trt_build import gpu_info

    return gpu_info()[0]


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "jetson": Path("/etc/nv_tegra_release").exists(),
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


class PowerSampler:
    """Mean power over a window from Jetson's INA3221 rails (hwmon sysfs); None where none is readable."""

    def __init__(self, period_s: float = 0.05) -> None:
        self.period_s = period_s
        self.rails = self._find_rails()
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _find_rails() -> list[tuple[Path, Path]]:
        rails = []
        for label in glob.glob("/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label"):
            lp = Path(label)
            idx = lp.name[2 : -len("_label")]
            volt, curr = lp.with_name(f"in{idx}_input"), lp.with_name(f"curr{idx}_input")
            name = lp.read_text().strip()
            if volt.exists() and curr.exists() and name.startswith("VIN"):
                rails.append((volt, curr))  # total board input only, so rails are not double counted
        return rails

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                w = sum(int(v.read_text()) * int(c.read_text()) for v, c in self.rails) / 1e6  # mV * mA
                self.samples.append(w)
            except (OSError, ValueError):
                return
            time.sleep(self.period_s)

    def __enter__(self) -> PowerSampler:
        if self.rails:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def mean_watts(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
