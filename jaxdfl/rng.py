"""Bulk random draws for the hot paths (attack noise, DP noise): ``jax.random``'s own stream, generated faster.

``jax.random.bits / uniform / normal / laplace`` with the default ``threefry2x32`` keys hash each element's index
with Threefry-2x32 (20 rounds). On CPU, JAX lowers that hash as a ``fori_loop`` over its five 4-round blocks (to
keep compile times short), so XLA materialises four ``uint32`` arrays of the output's size per block: about
20 ns per float32 normal on a 2-core CPU, more than a robust aggregation rule spends per element. Here the same
hash is written out straight (:func:`threefry2x32`), so XLA fuses the hash, the float conversion and the
inverse-CDF transform into one elementwise loop (about 5x faster, see ``benchmarks/noise.py``).

The draws of :func:`normal` and :func:`laplace` are bit for bit those of ``jax.random`` (same counters, same hash,
same transforms), so swapping these functions in changes no result. Inputs this fast path does not cover
(non-Threefry keys, non-float32 dtypes, ``jax_threefry_partitionable`` off, more than 2^32 elements) go to
``jax.random`` itself.

Differential-privacy noise needs more than that. ``jax.random`` maps 23 random bits to a float32 uniform and
inverts the CDF, so its normal draws never leave [-5.42, 5.22] and its Laplace draws [-15.5, 16.6]: an output
beyond the noise's reach then proves the presence of the example that shifted it, a failure of the claimed delta
(for DP-SGD at q = 0.01, z = 1.1, 10,000 steps it costs delta >= 8e-4; Mironov 2012 describes the general problem
of floating-point noise). :func:`dp_normal` and :func:`dp_laplace` draw a uniform with 23 mantissa bits in a binade
chosen by 104 more random bits, so the tails reach :data:`DP_NORMAL_REACH` = 11.83 sigma (P(N > 11.84) = 2^-106) and
:data:`DP_LAPLACE_REACH` = 72.8 scales. A finite reach still fails delta where a shift of the noise by the
sensitivity moves the reachable range off an outcome of positive probability: with a shift of s noise units that
costs P(N > reach - s) per release, which the accountant charges to delta
(:func:`jaxdfl.privacy.accounting.truncation_delta`; negligible unless s is large, i.e. very little noise).
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


#: Leading random bits that choose the binade of the DP draws' uniforms (so their smallest is 2^-(DP_BITS + 2)).
DP_BITS = 104


def _fine_uniform(w_sign_mantissa: jax.Array, w_hi: jax.Array, w_lo: jax.Array,
                  w_ext: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(sign, u)`` from three or four uint32 words: ``u`` in (0, 1/2) with 23 random mantissa bits in every binade.

    Definition: ``k`` = number of leading zeros of the 64-bit word ``w_hi:w_lo`` (P(k) = 2^-(k+1), k <= 64), or
    with ``w_ext`` of the :data:`DP_BITS` = 104-bit word ``w_hi:w_lo:w_ext:b`` (``b`` = bits 23..30 of
    ``w_sign_mantissa``, otherwise unused; k <= 104); ``m`` = the low 23 bits of ``w_sign_mantissa``;
    ``u = 2^-(k+2) (1 + m 2^-23)``, so P(u < x) = 2x up to the 2^-23 grid within a binade, down to x = 2^-66
    (2^-106 with ``w_ext``). The top bit of ``w_sign_mantissa`` gives ``sign`` in {-1, 1}. The extension changes
    the draw only when ``w_hi`` and ``w_lo`` are both 0 (probability 2^-64).
    """
    k = jnp.where(w_hi == 0, np.uint32(32) + lax.clz(w_lo), lax.clz(w_hi))
    if w_ext is not None:
        spare = (w_sign_mantissa >> np.uint32(23)) & np.uint32(0xFF)
        k_ext = jnp.where(w_ext == 0, np.uint32(32 - 24) + lax.clz(spare), lax.clz(w_ext))
        k = jnp.where(k == 64, np.uint32(64) + k_ext, k)
    mantissa = w_sign_mantissa & np.uint32((1 << 23) - 1)
    u = lax.bitcast_convert_type(((np.uint32(125) - k) << np.uint32(23)) | mantissa, jnp.float32)
    sign = jnp.where(w_sign_mantissa >> np.uint32(31) == 1, np.float32(-1.0), np.float32(1.0))
    return sign, u


def _words(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Four uint32 words per element: Threefry of counters (0, i) and (1, i) for element i."""
    words = jax.random.key_data(key)
    index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    a0, a1 = threefry2x32(words[0], words[1], jnp.zeros_like(index), index)
    b0, b1 = threefry2x32(words[0], words[1], jnp.ones_like(index), index)
    return a0, a1, b0, b1


def normal_from_words(w_sign_mantissa, w_hi, w_lo, w_ext=None) -> jax.Array:
    """Standard normal draws from three or four uint32 words each: ``sign * -ndtri(u)`` (``u`` from
    :func:`_fine_uniform`)."""
    sign, u = _fine_uniform(w_sign_mantissa, w_hi, w_lo, w_ext)
    return -sign * jax.scipy.special.ndtri(u)


def laplace_from_words(w_sign_mantissa, w_hi, w_lo, w_ext=None) -> jax.Array:
    """Standard Laplace draws from three or four uint32 words each: ``sign * -log(2 u)`` (``2 u`` uniform on
    (0, 1))."""
    sign, u = _fine_uniform(w_sign_mantissa, w_hi, w_lo, w_ext)
    return -sign * jnp.log(np.float32(2.0) * u)


def log_uniform_from_words(w_sign_mantissa, w_hi, w_lo, w_ext=None) -> jax.Array:
    """``log(U)`` for ``U`` uniform on (0, 1) from three or four uint32 words each: ``log(u)`` or ``log1p(-u)`` by
    the sign bit (``u`` from :func:`_fine_uniform`, in (0, 1/2)), so it is finite and < 0 for every word (a float32
    of 32 random bits reaches 1.0, whose log1p(-1) = -inf)."""
    sign, u = _fine_uniform(w_sign_mantissa, w_hi, w_lo, w_ext)
    return jnp.where(sign > 0, jnp.log(u), jnp.log1p(-u))


#: The largest magnitude :func:`dp_normal` draws (its smallest uniform is 2^-106), rounded down: a lower bound on
#: the reach, so that the accountant's truncation charge (the mass beyond it) is an upper bound.
DP_NORMAL_REACH = 11.83
#: The largest magnitude :func:`dp_laplace` draws, -log(2^-105) = 72.78, rounded down.
DP_LAPLACE_REACH = 72.7


def _dp_draw(transform, key: jax.Array, shape) -> jax.Array:
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    if not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
            and str(jax.random.key_impl(key)) == "threefry2x32" and math.prod(shape) < 2**32):
        raise ValueError("DP noise needs a scalar threefry2x32 typed key and fewer than 2^32 draws")
    return transform(*_words(key, shape))


def dp_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Standard normal draws for differential privacy, with tails to 11.8 sigma (see the module docstring).

    ``key``: a typed threefry2x32 key (scalar); drawn in float32, returned as ``dtype`` with shape ``shape``.
    """
    return _dp_draw(normal_from_words, key, shape).astype(dtype)


def dp_log_uniform(key: jax.Array, shape) -> jax.Array:
    """``log(U)``, ``U`` uniform on (0, 1), float32: finite and < 0, with the resolution of :func:`dp_normal`'s
    uniforms near both ends (the DP-SGD Poisson sampler's geometric gaps)."""
    return _dp_draw(log_uniform_from_words, key, shape)


def dp_laplace(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Standard Laplace draws (scale 1) for differential privacy, with tails to 72.8 scales (see :func:`dp_normal`)."""
    return _dp_draw(laplace_from_words, key, shape).astype(dtype)
