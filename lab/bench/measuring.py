"""How the benchmark measures: the machine, peak memory (CUDA's allocator peak, or the CPU resident set's high-water
mark), wall time with device synchronisation, the arms' alternating order, the guidance step's own time at every UNet
call (`GuidanceStepTimer`), and fresh worker processes for CPU memory peaks (`python -m lab.bench --worker`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lab import ROOT
from lab.bench.config import WORKER_TAG, BenchConfig


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it (with family/model numbers when the name is generic)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_info(config: BenchConfig) -> dict[str, Any]:
    import diffusers
    import transformers

    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _meminfo_bytes("MemTotal"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": config.device,
        "dtype": config.dtype,
    }
    if config.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(config.device))
    return info


def _proc_bytes(path: str, key: str) -> int | None:
    """A `key: N kB` field of a /proc file in bytes (None where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _meminfo_bytes(key: str) -> int | None:
    return _proc_bytes("/proc/meminfo", key)


def _status_bytes(key: str) -> int | None:
    """A `Vm*` field of /proc/self/status in bytes."""
    return _proc_bytes("/proc/self/status", key)


def _reset_peak_rss() -> bool:
    """Resets the process's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the enclosed code: CUDA allocator peak, or the CPU resident set's high-water mark.

    On CPU it resets VmHWM and reads it back; where the reset is not allowed it samples VmRSS every millisecond.
    `peak` and `baseline` are bytes; `method` says how they were measured.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.peak = self.baseline = 0
        self.method = ""
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status_bytes("VmRSS") or 0)

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        # Reset first, then read: the high-water mark then covers the baseline reading, so peak >= baseline.
        reset = _reset_peak_rss()
        self.baseline = _status_bytes("VmRSS") or 0
        if reset:
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        else:
            self.method = "VmRSS sampled every 1 ms"
            self.peak = self.baseline
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        else:
            # The kernel's RSS counters are approximate (per-CPU batches, ~100s of KiB): never report a peak below
            # the readings taken around the call.
            self.peak = max(_status_bytes("VmHWM") or 0, _status_bytes("VmRSS") or 0, self.baseline)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak,
            "baseline_bytes": self.baseline,
            "increment_bytes": self.peak - self.baseline,
            "method": self.method,
        }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def alternating_order(names: list[str], rounds: int) -> list[list[str]]:
    """Run order per round: forward, then reversed, so a drift of the machine's speed hits every arm alike."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def setup_torch(config: BenchConfig) -> None:
    torch.set_num_threads(config.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def run_worker(task: dict[str, Any], config: BenchConfig, timeout: float = 1800) -> dict[str, Any]:
    """Runs `task` in a fresh Python process (`python -m lab.bench --worker`) and returns its JSON result."""
    env = dict(os.environ)
    # The lab and the single-file pipeline live at the repository root; make them importable from anywhere.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    payload = json.dumps({"task": task, "config": asdict(config)})
    command = [sys.executable, "-m", "lab.bench", "--worker", payload]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG) :])
    raise RuntimeError(
        f"bench worker {task} failed (exit code {done.returncode}):\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"
    )


class GuidanceStepTimer:
    """Times, at every UNet call, what runs between the UNet's mid block returning h and its first up block starting:
    the forward hooks on `unet.mid_block`, that is the guidance step (the Balancing Act pipeline's hook guides h
    there; for the stock pipeline the hook does nothing).

    Built on `torch.nn.Module` hooks of the UNet alone (a forward hook put first on `mid_block`, a forward pre-hook on
    `up_blocks[0]`), so it needs none of the pipeline's internals. On CUDA it records CUDA events (no host-device
    synchronisation: the gap on the device's timeline, which is what the wall time pays), on CPU `perf_counter`.
    `collect()` returns the milliseconds of the calls since the last `collect()`; on CUDA call it after a
    synchronisation.
    """

    def __init__(self, unet: torch.nn.Module, device: str):
        self.cuda = device.startswith("cuda")
        self._start: Any = None
        self._pending: list[tuple[Any, Any]] = []
        self._handles = [
            unet.mid_block.register_forward_hook(self._on_h, prepend=True),
            unet.up_blocks[0].register_forward_pre_hook(self._on_up),
        ]

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _on_h(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._start = self._now()

    def _on_up(self, module: torch.nn.Module, args: Any) -> None:
        if self._start is not None:
            self._pending.append((self._start, self._now()))
            self._start = None

    def collect(self) -> list[float]:
        pending, self._pending = self._pending, []
        if self.cuda:
            return [start.elapsed_time(end) for start, end in pending]
        return [(end - start) * 1000 for start, end in pending]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> "GuidanceStepTimer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
