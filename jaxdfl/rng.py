"""Bulk random draws for the hot paths (attack noise, DP noise): ``jax.random``'s own stream, generated faster.

``jax.random.bits / uniform / normal / laplace`` with the default ``threefry2x32`` keys hash each element's index
with Threefry-2x32 (20 rounds). On CPU, JAX lowers that hash as a ``fori_loop`` over its five 4-round blocks (to
keep compile times short), so XLA materialises four ``uint32`` arrays of the output's size per block: about
20 ns per float32 normal on a 2-core CPU, more than a robust aggregation rule spends per element. Here the same
hash is written out straight (:func:`threefry2x32`), so XLA fuses the hash, the float conversion and the
inverse-CDF transform into one elementwise loop (about 5x faster, see ``benchmarks/noise.py``).

The draws are bit for bit those of ``jax.random`` (same counters, same hash, same transforms), so swapping these
functions in changes no result. Inputs this fast path does not cover (non-Threefry keys, non-float32 dtypes,
``jax_threefry_partitionable`` off, more than 2^32 elements) go to ``jax.random`` itself.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Threefry-2x32 rotation constants, alternating per 4-round block (Salmon et al., 2011).
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x: jax.Array, d: int) -> jax.Array:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher with 20 rounds, unrolled: ``(key, counter) -> two uint32 words``.

    Definition (Salmon, Moraes, Dror, Shaw 2011): key schedule ``ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)``; inject
    ``x += (ks[0], ks[1])``; then five blocks of four rounds ``x0 += x1; x1 = rotl(x1, r) ^ x0`` with the rotations
    alternating between (13, 15, 26, 6) and (17, 29, 16, 24), block b ending with the key injection
    ``x += (ks[(b + 1) % 3], ks[(b + 2) % 3] + b + 1)``.

    Args:
        k0, k1: uint32 key words (scalars or arrays broadcasting with the counters).
        x0, x1: uint32 counter words.

    Returns:
        (y0, y1) uint32, the broadcast shape of the inputs.
    """
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _fast(key: jax.Array, shape: tuple[int, ...], dtype) -> bool:
    """Whether this draw can take the unrolled path and stay bit-identical to ``jax.random``."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return False
    return (key.shape == () and str(jax.random.key_impl(key)) == "threefry2x32"
            and bool(jax.config.jax_threefry_partitionable) and jnp.dtype(dtype) == jnp.float32
            and math.prod(shape) < 2**32)


def _bits32(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bits(key, shape, uint32)`` for a Threefry key: with ``jax_threefry_partitionable`` (JAX's
    default) an element's counter is its linear index (high word 0 below 2^32 elements)."""
    words = jax.random.key_data(key)
    index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    y0, y1 = threefry2x32(words[0], words[1], jnp.zeros_like(index), index)
    return y0 ^ y1


def _uniform32(key: jax.Array, shape: tuple[int, ...], minval: float, maxval: float) -> jax.Array:
    """``jax.random.uniform`` in float32: 23 random mantissa bits in [1, 2), shifted and scaled, floored at minval."""
    mantissa = _bits32(key, shape) >> np.uint32(32 - 23)
    floats = lax.bitcast_convert_type(mantissa | np.float32(1.0).view(np.uint32), jnp.float32) - np.float32(1.0)
    lo, hi = np.float32(minval), np.float32(maxval)
    return jnp.maximum(lo, floats * (hi - lo) + lo)


def _draw(fast, fallback, key: jax.Array, shape, dtype) -> jax.Array:
    """``fast(key, shape)`` where it is bit-identical to ``jax.random`` (:func:`_fast`), else
    ``fallback(key, shape, dtype)``; ``shape`` as ``jax.random`` takes it (a sequence of ints, or one int)."""
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    return fast(key, shape) if _fast(key, shape, dtype) else fallback(key, shape, dtype)


def normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Standard normal draws, equal to ``jax.random.normal(key, shape, dtype)``.

    Definition (as in ``jax.random``): ``sqrt(2) * erfinv(u)`` with ``u`` uniform on
    ``[nextafter(-1, 0), 1)``.

    Args:
        key: a typed PRNG key (scalar).
        shape: output shape.
        dtype: a floating dtype (float32 takes the fast path).

    Returns:
        ``shape`` array of ``dtype``.
    """
    return _draw(_normal32, jax.random.normal, key, shape, dtype)


def laplace(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Standard Laplace draws (scale 1), equal to ``jax.random.laplace(key, shape, dtype)``.

    Definition (as in ``jax.random``): ``sign(u) * log1p(-|u|)`` with ``u`` uniform on ``[-1 + epsneg, 1)``.

    Args:
        key: a typed PRNG key (scalar).
        shape: output shape.
        dtype: a floating dtype (float32 takes the fast path).

    Returns:
        ``shape`` array of ``dtype``.
    """
    return _draw(_laplace32, jax.random.laplace, key, shape, dtype)


# Compiled as one program, as jax.random compiles its draws: op by op (outside jit) XLA would round the transform
# differently in the last bit. Inside a caller's jit these inline.
@partial(jax.jit, static_argnums=1)
def _normal32(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(np.sqrt(2)) * lax.erf_inv(_uniform32(key, shape, lo, 1.0))


@partial(jax.jit, static_argnums=1)
def _laplace32(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    u = _uniform32(key, shape, -1.0 + float(np.finfo(np.float32).epsneg), 1.0)
    return jnp.sign(u) * jnp.log1p(-jnp.abs(u))
