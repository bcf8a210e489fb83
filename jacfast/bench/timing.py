"""Timing primitives: warm-up, repeats, medians and percentiles, CPU or CUDA clocks."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20th/80th percentiles over ``repeats`` calls."""

    median: float
    p20: float
    p80: float
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _time_call(fn: Callable, arg, device: torch.device) -> float:
    """Seconds of one call ``fn(arg)``: CUDA events on a GPU, ``perf_counter`` on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn(arg)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def _summary(samples: list[float]) -> Timing:
    samples = sorted(samples)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples))


def measure_blocks(fns: dict[str, Callable], device: torch.device, *, rounds: int = 5, min_time: float = 0.5,
                   min_repeats: int = 10, max_repeats: int = 1000, warmup: int = 3,
                   setups: Optional[dict[str, Callable]] = None) -> dict[str, Timing]:
    """Several providers timed in blocks that take turns.

    Provider ``name`` is ``fns[name](i)`` for i = 0, 1, 2, ...: it picks its inputs from a
    rotation by ``i``. With ``setups[name]``, ``fns[name](setups[name](i))`` is timed and the
    setup runs untimed just before (e.g. the forward whose backward is timed). Each call is
    timed on its own (CUDA events on a GPU), so a median is robust to the occasional stall.

    In each of ``rounds`` rounds every provider (in an order rotated each round) runs one
    untimed call, then a block of timed calls: its share (1 / rounds) of ``min_repeats`` and
    ``min_time``. Load that drifts over seconds then falls on every provider's samples alike,
    as with round-robin calls (:func:`measure_interleaved`), without charging each call the
    wake-up of switching providers (the untimed call takes it).
    """
    names = list(fns)
    setups = setups or {}
    prepare = {name: setups.get(name) or (lambda i: i) for name in names}
    index = dict.fromkeys(names, 0)
    samples: dict[str, list[float]] = {name: [] for name in names}

    def call(name, timed):
        arg = prepare[name](index[name])
        index[name] += 1
        if timed:
            samples[name].append(_time_call(fns[name], arg, device))
        else:
            fns[name](arg)

    for name in names:
        for _ in range(warmup):
            call(name, False)
    share_n, share_t = -(-min_repeats // rounds), min_time / rounds
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call(name, False)
            block: list[float] = []
            while len(samples[name]) < max_repeats and (len(block) < share_n or sum(block) < share_t):
                call(name, True)
                block.append(samples[name][-1])
    return {name: _summary(values) for name, values in samples.items()}


def measure_interleaved(fns: dict[str, Callable], device: torch.device, *, min_time: float = 0.5,
                        min_repeats: int = 10, max_repeats: int = 1000, warmup: int = 3,
                        raw: Optional[dict] = None, setups: Optional[dict[str, Callable]] = None) -> dict[str, Timing]:
    """Like :func:`measure_blocks` (the same ``fns`` and ``setups``), but round-robin:
    call i of every provider runs before call i + 1 of any, in an order rotated each round.
    Stops once each provider has ``min_repeats`` calls and ``min_time`` seconds per provider
    have passed. On a loaded machine this keeps ratios honest; back-to-back blocks would
    charge one provider for a load spike the others missed. ``raw``, if given, receives each
    provider's seconds per round, in round order (for :func:`paired_ratio`).
    Caveat: on a small VM a call that follows another provider's pays a constant wake-up
    (OpenMP workers), so the loss head uses :func:`measure_blocks`."""
    names = list(fns)
    setups = setups or {}
    prepare = {name: setups.get(name, lambda i: i) for name in names}
    for name in names:
        for i in range(warmup):
            fns[name](prepare[name](i))
    samples: dict[str, list[float]] = {name: [] for name in names}
    started, i = time.perf_counter(), warmup
    while i - warmup < max_repeats and (i - warmup < min_repeats
                                        or time.perf_counter() - started < min_time * len(names)):
        shift = (i - warmup) % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_time_call(fns[name], prepare[name](i), device))
        i += 1
    if raw is not None:
        raw.update({name: list(values) for name, values in samples.items()})
    return {name: _summary(values) for name, values in samples.items()}


class TimeBudget:
    """When a benchmark stops starting new configurations (``bench --time-budget``).

    A device lent for minutes must come back with results: a benchmark asks ``expired()``
    before each configuration (size, dtype, K ...) and returns what it measured so far once
    it says True; ``skipped`` then records that the run is incomplete. ``seconds=None``:
    no limit.
    """

    def __init__(self, seconds: Optional[float] = None):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"the time budget must be a positive number of seconds, got {seconds!r}")
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds
        self.skipped = False

    def expired(self) -> bool:
        if self._end is not None and time.monotonic() >= self._end:
            self.skipped = True
        return self.skipped


def paired_ratio(raw: dict, num: str, den: str) -> float:
    """Median over rounds of num's time / den's time in the same round: under a load that
    changes from round to round, steadier than the ratio of the two medians."""
    return statistics.median(_round_ratios(raw, num, den))


def _round_ratios(raw: dict, num: str, den: str) -> list[float]:
    return [a / b for a, b in zip(raw[num], raw[den])]


def paired_ratio_interval(raw: dict, num: str, den: str, *, level: float = 0.95, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval (percentile, ``level``) of :func:`paired_ratio`: rounds resampled with
    replacement, a fixed seed so that the same samples give the same interval. An interval
    whose lower end is >= 1 says num is slower than den beyond the round-to-round noise."""
    ratios = _round_ratios(raw, num, den)
    gen = random.Random(seed)
    medians = sorted(statistics.median(gen.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return _quantile(medians, tail), _quantile(medians, 1.0 - tail)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Drop what native code writes to file descriptor 2 (the profiler's start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[object], object], arg: object, device: torch.device) -> int:
    """Bytes one call of ``fn(arg)`` allocates above what is allocated when it starts.

    CUDA: ``max_memory_allocated``. CPU: the allocations and frees of torch's CPU allocator
    recorded by ``torch.profiler`` (``profile_memory=True``), replayed in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(arg)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence kineto's "no GPU" error lines
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(arg)
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as handle:
            events = [e for e in json.load(handle)["traceEvents"] if e.get("name") == "[memory]"]
    # A free of a block allocated before the call (not seen here) does not lower its own usage.
    live, current, peak = {}, 0, 0
    for e in sorted(events, key=lambda e: e["ts"]):
        args = e["args"]
        if args.get("Device Type", 0) != 0:
            continue
        addr, nbytes = args["Addr"], args["Bytes"]
        if nbytes > 0:
            live[addr] = nbytes
            current += nbytes
            peak = max(peak, current)
        elif addr in live:
            current -= live.pop(addr)
    return peak


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> Optional[int]:
    """Size of the largest cache of CPU 0 (Linux sysfs ``index*/size``, e.g. "32768K"), or None
    where unknown. On a VM this is the host socket's L3, shared with other tenants."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in glob.glob(os.path.join(root, "index*", "size")):
        try:
            with open(path) as handle:
                text = handle.read().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes) if sizes else None


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate through so that together they exceed the caches: 256 MiB
    on a GPU (several times an H100's or H200's L2), on a CPU twice its last-level cache and
    at least 128 MiB (L3s of 100 MiB and more exist)."""
    if device.type == "cuda":
        cache = 256 * 2**20
    else:
        cache = max(128 * 2**20, 2 * (last_level_cache_bytes() or 0))
    return max(1, min(32, -(-cache // max(1, bytes_per_set))))


SYSTEM_ALLOCATOR = "system default (untuned)"


def keep_freed_memory() -> str:
    """Make glibc keep freed blocks below 32 MiB for reuse instead of returning them to the OS.

    By default glibc serves large blocks by mmap (or trims the heap) and gives them back on
    free, so the next tensor of that size page-faults all its memory again, a cost that falls
    at random on every provider (eager, torch.compile and jacfast alike), depending on the
    order of allocations (docs/performance.md). PyTorch's CPU
    tuning guide recommends a caching allocator for the same reason. Returns what was set.
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc: mmap threshold 32 MiB, no trim" if ok else "default (mallopt unavailable)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # The last-level cache (the largest of CPU 0) tells apart VMs that report the same model
    # name and copy at very different rates (docs/performance.md).
    cache = last_level_cache_bytes()
    cache_text = f", {cache / 2**20:.0f} MiB LLC" if cache and cache >= 2**20 else ""
    return f"{model} ({torch.get_num_threads()} threads{cache_text})"


def git_revision() -> Optional[str]:
    """HEAD's short hash, with "+dirty" when tracked files (result files aside) differ from it:
    a result measured with uncommitted code must not claim a commit's. None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:
        revision = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)benchmarks/results")
    except Exception:
        return None
    return f"{revision}+dirty" if changed else revision


def environment(device: torch.device) -> dict:
    """Where and with what a result was measured: device, versions, git revision, time."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "git_revision": git_revision(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
