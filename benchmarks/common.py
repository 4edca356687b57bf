"""Shared helpers for the benchmark scripts: timing, machine description, machine limits."""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def timeit(fn, *args, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn(*args)`` in seconds (results blocked on), after ``warmup`` calls."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine() -> str:
    """CPU model, core count, jax version and device, and the load average when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
            f"load average at start {load:.1f}")


def bandwidth_gbs(nbytes: int = 1 << 29, repeat: int = 7) -> float:
    """Sustained memory bandwidth in GB/s: ``a <- a + 1`` on a donated buffer, one read and one write per byte.

    Donating the buffer keeps the output in pages that are already mapped; a fresh output would also time the
    kernel zero-filling new pages on first touch, which halves the apparent bandwidth on Linux.
    """
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    a = step(jnp.zeros((nbytes // 4,), jnp.float32)).block_until_ready()
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        a = step(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def matmul_gflops(n: int = 2048) -> float:
    """Achieved float32 matrix-multiply throughput, GFLOP/s (the machine's practical compute limit)."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    t = timeit(mm, a, repeat=5)
    return 2 * n**3 / t / 1e9
