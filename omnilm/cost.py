"""What a run costs beside its FLOPs (omnilm.model.flops): the machine's matmul peak, measured, for
model FLOPs utilisation (MFU), and the energy used, for joules per token.

MFU is the FLOPs the model needs (not those a kernel wastes on padding or recomputes) over the
time taken, as a share of the peak (Chowdhery et al. 2022, PaLM, appendix B). The peak here is not
a datasheet's: it is what torch.mm reaches on this machine, at the run's dtype and thread count,
so that a CPU run's MFU says how close the run came to what its matmuls can do.

Energy comes from the best counter there is, and each reading names it:

    nvml      an NVIDIA GPU's own counter, total energy since the driver loaded (nvidia-ml-py,
              imported only then): the GPU alone, not the host
    rapl      the CPU packages' counters in sysfs (Intel RAPL, also AMD's, through the same
              powercap interface): the whole package, so whatever else runs on it counts too
    estimate  neither is readable (most containers and VMs): a stated power times busy time,
              CPU_WATTS_PER_CORE per CPU-second of this process, or GPU_WATTS per second of the run
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# An estimate's constants. A busy CPU core: a server CPU's TDP over its cores is 4-8 W (a 64-core
# part at 280 W), a desktop's 8-15 W (8 cores at 65-125 W); 10 W is the middle. An accelerator
# without a counter is taken as busy at 300 W for the whole run (the TDP of an A100 PCIe; an H100
# SXM's is 700 W, an L4's 72 W).
CPU_WATTS_PER_CORE = 10.0
GPU_WATTS = 300.0
RAPL_ROOT = Path("/sys/class/powercap")


# --- the matmul peak ------------------------------------------------------------------------------


def matmul_peak(device: str | torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The FLOP/s torch.mm reaches on `device` at `dtype` and the current thread count, measured
    once per process (`measure_matmul_peak`) and remembered."""
    device = torch.device(device)
    return _peak(str(device), dtype, torch.get_num_threads())


@functools.cache
def _peak(device: str, dtype: torch.dtype, threads: int) -> float:
    return measure_matmul_peak(device, dtype)


def measure_matmul_peak(device: str | torch.device, dtype: torch.dtype = torch.float32,
                        seconds: float = 0.3) -> float:
    """Best FLOP/s of torch.mm on two random n x n matrices of `dtype` (n = 1024 on a CPU, 2.1
    GFLOP a product; 4096 elsewhere, 137 GFLOP), 2 n^3 FLOPs a product. After one product to warm
    up, products are timed in rounds of about 20 ms (the device synchronised around each round)
    for `seconds`, and the fastest round gives the rate: the most this machine's matmuls do at
    this dtype and thread count, which other work on the machine can only lower."""
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 4096
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))

    def timed(k: int) -> float:
        _synchronize(device)
        t0 = time.perf_counter()
        for _ in range(k):
            torch.mm(a, b)
        _synchronize(device)
        return time.perf_counter() - t0

    per_round = max(1, int(0.02 / timed(1)))
    best, end = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < end:
        best = max(best, per_round * 2 * n ** 3 / timed(per_round))
    return best


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def utilisation(flops: float, seconds: float, peak: float) -> float | None:
    """MFU: `flops` done in `seconds` as a share of `peak` FLOP/s (None without time or FLOPs)."""
    return flops / seconds / peak if flops and seconds > 0 and peak > 0 else None


# --- energy ---------------------------------------------------------------------------------------


@dataclass
class _Counter:
    """One energy counter: `read()` gives its value in joules; it wraps to 0 after `wrap` (None:
    never)."""

    read: Callable[[], float]
    wrap: float | None = None


class EnergyMeter:
    """Joules used since the meter was made, from one or more counters (a GPU; the CPU packages).

    `poll()` reads the counters and adds what each moved since the last poll. A RAPL counter wraps
    around (at max_energy_range_uj, typically 262 kJ: 20 minutes of a package at 200 W), and a wrap
    is seen only if it is read at least once in between: poll every few minutes at least (the
    training loop does at every step)."""

    def __init__(self, method: str, counters: list[_Counter], note: str):
        self.method, self.note, self._counters = method, note, counters
        self._last = [c.read() for c in counters]
        self.joules = 0.0

    def poll(self) -> float:
        """Joules used so far."""
        for i, counter in enumerate(self._counters):
            now = counter.read()
            moved = now - self._last[i]
            if moved < 0 and counter.wrap is not None:
                moved += counter.wrap
            self.joules += max(moved, 0.0)
            self._last[i] = now
        return self.joules

    def own_joules(self) -> float:
        """Joules used so far, as this process's term of a sum over the processes of a run: a
        machine's RAPL counters count once, in the machine's first process (LOCAL_RANK 0)."""
        joules = self.poll()
        return joules if self.method != "rapl" or os.environ.get("LOCAL_RANK", "0") == "0" else 0.0

    @classmethod
    def for_device(cls, device: str | torch.device, rapl_root: Path = RAPL_ROOT) -> EnergyMeter:
        """The best meter of what a run on `device` uses: NVML for a CUDA device, RAPL for the
        CPU, and an estimate where the counter is missing or unreadable."""
        device = torch.device(device)
        meter = cls.nvml(device) if device.type == "cuda" else cls.rapl(rapl_root) if device.type == "cpu" else None
        return meter or cls.estimate(device)

    @classmethod
    def nvml(cls, device: torch.device | int) -> EnergyMeter | None:
        """An NVIDIA GPU's energy counter (nvmlDeviceGetTotalEnergyConsumption, millijoules since
        the driver loaded; Volta and later): `device` is a CUDA device, found in NVML by its UUID,
        or an NVML index. None without nvidia-ml-py, a driver, or a counter on this GPU."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            if isinstance(device, int):
                handle = pynvml.nvmlDeviceGetHandleByIndex(device)
            else:
                uuid = str(torch.cuda.get_device_properties(device).uuid)
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
            meter = cls("nvml", [_Counter(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3)],
                        "the GPU alone, not its host")
        except pynvml.NVMLError:
            return None
        return meter

    @classmethod
    def rapl(cls, root: Path = RAPL_ROOT) -> EnergyMeter | None:
        """The CPU packages' RAPL counters: each `intel-rapl:N` directory (a package; its
        subdomains `intel-rapl:N:M`, core and uncore, are parts of it and are not added again, nor
        is a platform domain, psys) with its energy_uj and max_energy_range_uj, in microjoules.
        None where there is none, or one is unreadable (since 2020 they are root's alone by
        default: CVE-2020-8694)."""
        counters = []
        for domain in sorted(root.glob("intel-rapl:*")):
            try:
                if domain.name.count(":") != 1 or not (domain / "name").read_text().startswith("package"):
                    continue
                wrap = int((domain / "max_energy_range_uj").read_text()) / 1e6
                energy = domain / "energy_uj"
                int(energy.read_text())  # readable now, or not at all
            except (OSError, ValueError):
                return None
            counters.append(_Counter(lambda energy=energy: int(energy.read_text()) / 1e6, wrap))
        if not counters:
            return None
        return cls("rapl", counters, f"{len(counters)} CPU package(s), whatever else runs on them included")

    @classmethod
    def estimate(cls, device: str | torch.device) -> EnergyMeter:
        """No counter: CPU_WATTS_PER_CORE per CPU-second of this process (user and system time of
        all its threads) on a CPU, GPU_WATTS per second of the run on an accelerator."""
        if torch.device(device).type == "cpu":
            return cls("estimate", [_Counter(lambda: CPU_WATTS_PER_CORE * time.process_time())],
                       f"{CPU_WATTS_PER_CORE:g} W per busy CPU core x this process's CPU seconds, as no RAPL "
                       "counter is readable")
        return cls("estimate", [_Counter(lambda: GPU_WATTS * time.monotonic())],
                   f"{GPU_WATTS:g} W x the seconds since the meter started, as no energy counter of this "
                   f"{torch.device(device).type} device is readable")


# --- a run's account ------------------------------------------------------------------------------


class RunCost:
    """A run's FLOPs, tokens and step seconds, added up step by step, and its energy: a training run
    (a step: an optimizer step) or an eval (a step: a batch of answers generated, omnilm.eval.vqa)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.meter = EnergyMeter.for_device(device)
        self.flops = self.tokens = self.seconds = 0.0

    def step(self, flops: list[int | None], tokens: int, seconds: float) -> None:
        """One step: the FLOPs of this process's micro-batches (None: not counted, and the run gets
        no MFU), the tokens of every process, the step's time."""
        self.flops = None if None in flops or self.flops is None else self.flops + sum(flops)
        self.tokens += tokens
        self.seconds += seconds
        self.meter.poll()  # often enough to see a RAPL counter wrap

    def summary(self, total: Callable[[float], float] = float, world: int = 1) -> dict[str, Any]:
        """MFU and joules per token of the steps so far. `total` sums a number over the processes
        (the identity on one), `world` counts them: MFU is against `world` times this machine's peak."""
        flops = total(self.flops) if self.flops is not None else None
        joules = total(self.meter.own_joules())
        peak = matmul_peak(self.device, self.dtype)
        mfu = utilisation(flops, self.seconds, peak * world) if flops is not None else None
        return {"flops": flops, "step_seconds": round(self.seconds, 3), "peak_flops": round(peak),
                "peak_dtype": str(self.dtype).removeprefix("torch."),
                "mfu": round(mfu, 6) if mfu is not None else None, "joules": round(joules, 3),
                "joules_per_token": round(joules / self.tokens, 6) if self.tokens else None,
                "energy_method": self.meter.method, "energy_note": self.meter.note}


def describe_cost(cost: dict[str, Any]) -> str:
    """A `RunCost.summary` in one line, saying how each figure was found."""
    mfu = "MFU not counted (no FLOPs count for this model)"
    if cost["mfu"] is not None:
        mfu = (f"MFU {100 * cost['mfu']:.2f}% (of torch.mm's {cost['peak_flops'] / 1e9:,.1f} GFLOP/s in "
               f"{cost['peak_dtype']}, measured here)")
    energy = f"{cost['joules_per_token']:.4g} J/token" if cost["joules_per_token"] is not None else "no tokens"
    return f"{mfu}; {energy} ({cost['energy_method']}: {cost['energy_note']})"
