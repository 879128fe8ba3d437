"""How much memory this process uses, what the machine has free, and what a budget like "6GB" means.

One meter per kind of machine, all with the same three calls (current, reset_peak, peak):

- CPU only: the process's resident set size (RSS). Its peak is the kernel's own high-water mark
  (VmHWM in /proc/self/status), which /proc/self/clear_refs resets, so a peak between two reads is
  never missed, however short.
- Jetson (unified memory: CPU and GPU share one DRAM, and what CUDA allocates is not in the RSS): the
  memory the whole system uses (MemTotal - MemAvailable in /proc/meminfo, the figure tegrastats' RAM
  field shows) above what it used when the meter started, plus this process's RSS at that moment.
  Whatever other processes allocate meanwhile counts too: conservative by design. Peaks are sampled.
- Discrete NVIDIA GPU: RSS plus this process's GPU memory as NVML reports it (nvidia-ml-py), sampled.

Only the CPU meter runs in this project's CI; the Jetson and NVML readers are tested on recorded text.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from omniedge.errors import OmniedgeError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
BUDGET_HELP = "a size (6GB = 6e9 bytes, 6GiB or 6G = 6 x 2^30) or a share of free memory (50%% or 0.5)"


def parse_size(text: str | int) -> int:
    """Bytes from `6GB` (decimal), `6GiB` / `6G` (binary), `512MiB`, or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise OmniedgeError(f"cannot read {text!r} as a memory size", f"write {BUDGET_HELP}")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_budget(text: str | int | float, free_bytes: int, in_use: int = 0) -> int:
    """A budget in bytes: a size, or `in_use` plus a share of `free_bytes`, written `50%` or `0.5`."""
    s = str(text).strip()
    share: float | None = None
    if s.endswith("%"):
        share = float(s[:-1]) / 100 if _SIZE.match(s[:-1]) else -1.0
    elif isinstance(text, float) or re.fullmatch(r"0?\.[0-9]+|1\.0*", s):
        share = float(s)
    if share is not None:
        if not 0.0 < share <= 1.0:
            raise OmniedgeError(f"memory budget {text!r} is not a share in (0, 100%]", f"write {BUDGET_HELP}")
        return in_use + int(share * free_bytes)
    n = parse_size(text)
    if n <= 0:
        raise OmniedgeError(f"memory budget {text!r} is not positive", f"write {BUDGET_HELP}")
    return n


def mib(n: float) -> str:
    """`123.4 MiB` or `6.00 GiB`: how every budget message prints a size."""
    return f"{n / 2**20:.1f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------- readers


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def read_meminfo(text: str | None = None) -> dict[str, int]:
    """/proc/meminfo as bytes per field (MemTotal, MemAvailable, ...); `text` parses a recorded copy."""
    if text is None:
        try:
            text = Path("/proc/meminfo").read_text()
        except OSError:
            return {}
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def system_used_bytes(info: dict[str, int] | None = None) -> int:
    """Memory the whole system uses: MemTotal - MemAvailable (unified CPU + GPU memory on a Jetson)."""
    info = read_meminfo() if info is None else info
    return info.get("MemTotal", 0) - info.get("MemAvailable", 0)


_TEGRA_RAM = re.compile(r"\bRAM (\d+)/(\d+)([KMG])B")


def parse_tegrastats(line: str) -> tuple[int, int] | None:
    """(used, total) bytes from a tegrastats line (`RAM 2481/31002MB (lfb ...) ...`), None without one."""
    m = _TEGRA_RAM.search(line)
    if not m:
        return None
    unit = {"K": 2**10, "M": 2**20, "G": 2**30}[m.group(3)]
    return int(m.group(1)) * unit, int(m.group(2)) * unit


def tegrastats_once(timeout_s: float = 3.0) -> tuple[int, int] | None:
    """One reading of `tegrastats` (Jetson only): (used, total) bytes of unified memory, or None."""
    try:
        proc = subprocess.Popen(
            ["tegrastats", "--interval", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
    except OSError:
        return None
    try:
        assert proc.stdout is not None
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        line = proc.stdout.readline()
        timer.cancel()
        return parse_tegrastats(line)
    finally:
        proc.kill()
        proc.wait()


def nvml_process_bytes(pid: int | None = None) -> int | None:
    """GPU memory this process holds on every NVIDIA GPU per NVML, or None where NVML is not readable."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        pynvml.nvmlInit()
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == pid and p.usedGpuMemory:
                    total += int(p.usedGpuMemory)
        return total
    except pynvml.NVMLError:
        return None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_rss() -> int:
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return int(psutil.Process().memory_info().rss)


def release_freed_memory() -> None:
    """Hand memory freed by an unloaded engine back to the OS (glibc keeps it otherwise; RSS would not drop)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tune_malloc_for_serving(arenas: int = 2, mmap_threshold: int = 2**20) -> None:
    """glibc settings for a server whose engines load and unload while requests run on many threads:
    at most `arenas` malloc arenas (as MALLOC_ARENA_MAX does; each thread would otherwise grow its own),
    and blocks of `mmap_threshold` bytes or more always mapped on their own, so memory an evicted engine
    frees goes back to the OS at once instead of staying in a fragmented heap. Call before threads start."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, int(arenas))  # M_ARENA_MAX
        libc.mallopt(-3, int(mmap_threshold))  # M_MMAP_THRESHOLD (also stops glibc raising it)


# ---------------------------------------------------------------- meters


class MemoryMeter(Protocol):
    """What the scheduler measures with: bytes in use now, and the peak since the last reset."""

    kind: str

    def current(self) -> int: ...

    def reset_peak(self) -> None: ...

    def peak(self) -> int: ...

    def lifetime_peak(self) -> int: ...


class RssMeter:
    """Process RSS; peaks from the kernel's high-water mark (exact), or from the reads made where not Linux."""

    kind = "process RSS"

    def __init__(self) -> None:
        self._lifetime = 0
        self._seen = 0
        self._exact = _status_kib("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK)

    def current(self) -> int:
        now = process_rss()
        self._seen = max(self._seen, now)
        return now

    def peak(self) -> int:
        hwm = _status_kib("VmHWM") if self._exact else None
        return max(hwm or 0, self._seen, self.current() if hwm is None else 0)

    def reset_peak(self) -> None:
        self._lifetime = max(self._lifetime, self.peak())
        self._seen = 0
        if self._exact:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            except OSError:
                self._exact = False

    def lifetime_peak(self) -> int:
        return max(self._lifetime, self.peak())


class SampledMeter:
    """A reader polled by a background thread; the peak is the largest sample (and read) since the reset."""

    def __init__(self, read: Callable[[], int], kind: str, period_s: float = 0.005) -> None:
        self.kind = kind
        self._read = read
        self._period = period_s
        self._peak = 0
        self._lifetime = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="omniedge-memory", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._period):
            self.current()

    def current(self) -> int:
        now = self._read()
        self._peak = max(self._peak, now)
        return now

    def peak(self) -> int:
        return max(self._peak, self.current())

    def reset_peak(self) -> None:
        self._lifetime = max(self._lifetime, self.peak())
        self._peak = self._read()

    def lifetime_peak(self) -> int:
        return max(self._lifetime, self.peak())

    def close(self) -> None:
        self._stop.set()


def unified_memory_meter() -> SampledMeter:
    """Jetson: this process's RSS at start plus everything the system allocated since (CPU and GPU)."""
    start_rss, start_used = process_rss(), system_used_bytes()
    return SampledMeter(
        lambda: start_rss + max(0, system_used_bytes() - start_used), "unified memory (/proc/meminfo)"
    )


def rss_plus_gpu_meter() -> SampledMeter:
    """A discrete GPU: process RSS plus the process's GPU memory (NVML)."""
    return SampledMeter(lambda: process_rss() + (nvml_process_bytes() or 0), "process RSS + GPU (NVML)")


def default_meter(providers: list[str] | tuple[str, ...] = ()) -> MemoryMeter:
    """The meter for this machine: unified memory on a Jetson, RSS + NVML with a CUDA provider, else RSS."""
    on_gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers)
    if is_jetson():
        return unified_memory_meter()
    if on_gpu and nvml_process_bytes() is not None:
        return rss_plus_gpu_meter()
    return RssMeter()


def free_bytes() -> int:
    """What a share-of-free-memory budget is a share of: MemAvailable (unified memory on a Jetson)."""
    info = read_meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    import psutil

    return int(psutil.virtual_memory().available)
