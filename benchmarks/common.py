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
    dev = jax.devices()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
            f"on {dev.platform} ({dev.device_kind})")


def bandwidth_gbs(nbytes: int = 400_000_000) -> float:
    """Sustained memory bandwidth from a large array copy (read + write), GB/s."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    t = timeit(copy, x, repeat=5)
    return 2 * nbytes / t / 1e9


def matmul_gflops(n: int = 2048) -> float:
    """Achieved float32 matrix-multiply throughput, GFLOP/s (the machine's practical compute limit)."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    t = timeit(mm, a, repeat=5)
    return 2 * n**3 / t / 1e9
