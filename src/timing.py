"""Timing and memory of a piece of device work, for the benchmark scripts (scripts/benchmark_train.py).

Wall-clock times with ``torch.cuda.synchronize`` before and after on CUDA; memory as CUDA's
``max_memory_allocated``, or on the CPU as the peak resident set size sampled from
``/proc/self/statm`` (Linux) every millisecond, relative to a baseline taken after freed heap pages
were handed back to the OS (glibc ``malloc_trim``).
"""
from __future__ import annotations

import gc
import os
import threading
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory(device: torch.device) -> None:
    """Free what the previous method left: Python garbage, the CUDA cache, and the heap pages glibc
    keeps after a free (``malloc_trim``), so that the next RSS baseline counts live memory only."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include freed pages (peak underestimated)
        pass


def peak_memory(fn: Callable[[], object], device: torch.device, rss_before: int) -> float:
    """MB: CUDA max_memory_allocated over two calls of ``fn``; on the CPU the peak RSS sampled every
    millisecond during them, minus ``rss_before``."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(), fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak, done = [rss_bytes()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn(), fn()
    done.set()
    t.join()
    return (max(peak[0], rss_bytes()) - rss_before) / 2**20
