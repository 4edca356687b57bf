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


def timeit(fn, *args, repeat: int = 5, warmup: int = 1, stat=np.median) -> float:
    """``stat`` (default the median) of the wall times of ``repeat`` calls ``fn(*args)`` in seconds (results blocked
    on), after ``warmup`` calls."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(stat(times))


def machine(load: float | None = None) -> str:
    """CPU model, core count, jax version and device, and the load average when the run started (``load``, taken
    by the caller before it timed anything, or now)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    if load is None:
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


def best_time(fn, reps: int) -> float:
    """Best wall time in seconds of ``reps`` calls ``fn()`` (after one warm-up call, which also compiles)."""
    return timeit(fn, repeat=reps, stat=min)


def chained(fn, args, calls: int):
    """One compiled program calling ``fn(*args)`` ``calls`` times in a loop; returns a thunk that runs it.

    An optimisation barrier ties the inputs to the loop counter, so XLA cannot hoist the loop-invariant call out of
    the loop; the output is the loop carry, so every call's output reuses one buffer, as in the engine's scan.
    """
    out = jax.eval_shape(fn, *args)

    def body(i, carry):
        a, _ = carry
        a, _ = jax.lax.optimization_barrier((a, i))
        return a, fn(*a)

    prog = jax.jit(lambda *a: jax.lax.fori_loop(0, calls, body, (a, jnp.zeros(out.shape, out.dtype)))[1])
    return lambda: prog(*args)


def steady_timer(fn, args, calls: tuple[int, int] = (2, 10)):
    """A function ``measure(reps)`` giving the seconds per call of ``fn(*args)`` in steady state:
    ``(T(c2) - T(c1)) / (c2 - c1)`` for :func:`chained` programs, each ``T`` the best of ``reps`` runs.

    The two programs are compiled once, so ``measure`` can be called again later (interleaved timing passes). When
    timer noise swamps the difference (tiny calls), ``T(c2) / c2`` (fixed costs included) is returned instead.
    """
    c1, c2 = calls
    short, long = chained(fn, args, c1), chained(fn, args, c2)

    def measure(reps: int) -> float:
        t1 = best_time(short, reps)
        t2 = best_time(long, reps)
        per_call = (t2 - t1) / (c2 - c1)
        return per_call if per_call > 0 else t2 / c2

    return measure


def steady_time(fn, args, reps: int, calls: tuple[int, int] = (2, 10)) -> float:
    """Seconds per call in steady state, measured once (:func:`steady_timer`)."""
    return steady_timer(fn, args, calls)(reps)
