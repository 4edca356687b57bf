"""Differential-privacy mechanisms: pure jnp kernels for ONE node and ONE step.

Every function here is written for a single node (and a single local step or
round) and is lifted over the node axis with ``jax.vmap`` by the engine. The
numbers they need that are not data (clip norm, noise multiplier, expected
batch size, sampling rate) may be traced, so sweeping them does not recompile;
the ``mechanism`` name and the buffer length are static.

Modes (see ``jaxdfl.privacy.accounting`` for the matching accountant):

- ``example`` (DP-SGD, Abadi et al. 2016): ``poisson_batch`` draws a Poisson
  batch into a fixed buffer, per-example gradients are computed on it, and
  ``dp_sum`` clips each row to L2 norm C, sums, adds N(0, (z C)^2) to the SUM
  and divides by the public expected batch size b. Under add/remove-one
  adjacency the clipped sum has L2 sensitivity C, so each local step is one
  Poisson-subsampled Gaussian mechanism with rate q = b / m and multiplier z.
- ``update`` (local DP on the message): ``privatize_update`` clips the node's
  model update (L2 for Gaussian, L1 for Laplace) and adds noise before it
  leaves the node. One invocation per round over the node's whole dataset.

Non-finite values never leave a mechanism: a row or update that contains NaN
or inf is replaced by zeros before clipping, so it can neither crash a run nor
reveal (through a NaN message) that a particular example was present.

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", 2014.
"""

import jax
import jax.numpy as jnp

from jaxdfl import rng

MECHANISMS = ("gaussian", "laplace")


def _clip(v, clip, ord_):
    """Shared body of clip_l2 / clip_l1 (ord_ is the static norm order)."""
    clip = jnp.asarray(clip, v.dtype)
    finite = jnp.all(jnp.isfinite(v))
    v = jnp.where(finite, v, jnp.zeros_like(v))
    # Normalise by the largest magnitude first so that squaring cannot
    # overflow float32 (|v| > 1.8e19 would give an infinite norm and lose the
    # direction) nor underflow for tiny gradients. The scaling is two
    # multiplications by 1/sqrt(m), never by 1/m: XLA turns the division into
    # a reciprocal, and 1/m is subnormal (flushed to zero on CPU) for m > 8.5e37.
    m = jnp.max(jnp.abs(v))
    r = jax.lax.rsqrt(jnp.where(m > 0, m, jnp.ones_like(m)))
    u = (v * r) * r
    s = jnp.sqrt(jnp.sum(u * u)) if ord_ == 2 else jnp.sum(jnp.abs(u))
    norm = m * s  # may round to inf for huge v; only compared, never used
    # Both branches are computed; the unused one may hold inf/nan (s == 0),
    # jnp.where discards it without propagating.
    clipped = u * (clip / s)
    return jnp.where(norm > clip, clipped, v)


def clip_l2(v, clip):
    """Scale a vector onto the L2 ball of radius ``clip``.

    Definition: clip_l2(v, C) = v * min(1, C / ||v||_2). A vector with a
    non-finite entry is mapped to zeros. With C = inf this is the identity on
    finite vectors (bit-exact: the vector is returned untouched when
    ||v||_2 <= C).

    Args:
      v: [D] vector.
      clip: scalar C > 0, may be jnp.inf.

    Returns:
      [D], same dtype as v, with ||out||_2 <= C (up to float rounding).

    References:
      Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
    """
    return _clip(v, clip, 2)


def clip_l1(v, clip):
    """Scale a vector onto the L1 ball of radius ``clip``.

    Definition: clip_l1(v, C) = v * min(1, C / ||v||_1). A vector with a
    non-finite entry is mapped to zeros; C = inf is the identity on finite
    vectors. Used with the Laplace mechanism, whose scale is set by the L1
    sensitivity.

    Args:
      v: [D] vector.
      clip: scalar C > 0, may be jnp.inf.

    Returns:
      [D], same dtype as v, with ||out||_1 <= C (up to float rounding).

    References:
      Dwork & Roth, "The Algorithmic Foundations of Differential Privacy",
      2014 (Laplace mechanism, Def. 3.3).
    """
    return _clip(v, clip, 1)


def _noise_std(noise_multiplier, clip, dtype):
    """z * C, with 0 * inf read as 0 (no noise) rather than nan."""
    z = jnp.asarray(noise_multiplier, dtype)
    clip = jnp.asarray(clip, dtype)
    return jnp.where(z == 0, jnp.zeros_like(z), z * clip)


def dp_sum(key, grads, valid, clip, noise_multiplier, expected_batch):
    """DP-SGD gradient estimate from per-example gradients (one node, one step).

    Definition:
      g_hat = ( sum_{i : valid_i} clip_l2(g_i, C) + N(0, (z C)^2 I) ) / b
    where rows with a non-finite entry are zeroed, invalid rows contribute
    nothing, and b is the PUBLIC expected batch size (q * m), never the
    realised batch size (normalising by the realised size would make the
    divisor data-dependent and break the sensitivity argument). Under
    add/remove-one adjacency the clipped sum has L2 sensitivity C, so the
    noise is calibrated to the sum, not to the mean.

    With z = 0 and C = inf no arithmetic but the masked sum and the division
    by b takes place (the clip is a bitwise identity, the noise exactly 0), so
    the result is grads[valid].sum(0) / b up to the order XLA chooses for the
    float32 reduction (which depends on fusion; bitwise whenever the sum is
    order-independent, e.g. a single valid row).

    Args:
      key: typed PRNG key, used only for the noise.
      grads: [B, D] per-example gradients (flattened), B the static buffer.
      valid: [B] bool, which rows hold a sampled example.
      clip: scalar C > 0 (may be inf when z = 0).
      noise_multiplier: scalar z >= 0.
      expected_batch: scalar b > 0, the public expected batch size.

    Returns:
      [D], same dtype as grads.

    References:
      Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
    """
    rows = jnp.where(valid[:, None], grads, jnp.zeros_like(grads))
    clipped = jax.vmap(clip_l2, in_axes=(0, None))(rows, clip)
    return noisy_mean(key, jnp.sum(clipped, axis=0), clip, noise_multiplier, expected_batch)


def noisy_mean(key, total, clip, noise_multiplier, expected_batch):
    """``(total + N(0, (z C)^2 I)) / b``: the Gaussian mechanism on a clipped sum, normalised by the public b.

    ``total`` is a sum of per-example contributions of L2 norm at most ``clip`` (``C``); ``z = 0`` adds exactly
    nothing (also with ``C = inf``). Shared by :func:`dp_sum` and the engine's DP-SGD step.
    """
    dtype = total.dtype
    std = _noise_std(noise_multiplier, clip, dtype)
    noise = std * rng.dp_normal(key, total.shape, dtype)
    return (total + noise) / jnp.asarray(expected_batch, dtype)


def clip_factors(sq_norms, valid, clip):
    """Per-example factors ``s_i`` with ``s_i g_i = clip_l2(g_i, C)``, from the squared norms ``|g_i|^2``.

    Definition: ``s_i = min(1, C / |g_i|)`` for a valid example with a finite squared norm, else 0. An example whose
    float32 squared norm is not finite (a non-finite entry, or ``|g_i| > ~1.8e19``) contributes nothing: its
    contribution still has norm <= C, so the sensitivity and the privacy guarantee are unchanged (:func:`dp_sum`,
    which sees the vectors themselves, clips such a finite example instead).

    Args:
      sq_norms: [B] squared L2 norms of the per-example gradients.
      valid: [B] bool, which rows hold a sampled example.
      clip: scalar C > 0, may be inf.

    Returns:
      [B] factors in [0, 1], dtype of ``sq_norms``.
    """
    clip = jnp.asarray(clip, sq_norms.dtype)
    ok = valid & jnp.isfinite(sq_norms)
    # A zero norm (or one underflowing to 0) gives C / 0 = inf, so the factor is 1: the vector is left untouched.
    factor = jnp.minimum(jnp.ones_like(sq_norms), clip / jnp.sqrt(jnp.where(ok, sq_norms, 1.0)))
    return jnp.where(ok, factor, jnp.zeros_like(sq_norms))


def poisson_batch(key, size, rate, buffer, *, return_overflow=False):
    """Poisson-sample a batch from a shard into a fixed buffer with a mask.

    Definition: every index i in range(size) is included independently with
    probability ``rate`` (Poisson sampling, the scheme the subsampled-Gaussian
    accountant assumes; shuffled fixed-size batches would need a different
    analysis). The sampler walks the Bernoulli process by its gaps: the gap
    before each next selected index is Geometric(rate), drawn by inversion
    floor(log U / log(1 - rate)), so the cost is O(buffer), independent of the
    padded shard length. Inclusion probabilities are exact up to float32
    rounding of the gap distribution (relative error ~1e-7), the same order as
    the float rounding of the Gaussian noise itself.

    Overflow: if more than ``buffer`` indices are selected, only the first
    ``buffer`` (lowest indices) are kept. Truncation alone would break the
    add/remove sensitivity argument, so it is accounted instead: the run with
    truncation differs from the ideal Poisson run only on the event that some
    step overflows, whose probability eta is bounded by
    ``accounting.overflow_probability`` (union bound over steps, Binomial(m+1,
    q) tail so the add-one neighbour is covered). An ideal (eps, delta')
    guarantee then gives (eps, delta' + (1 + e^eps) eta) for the real run, and
    ``accounting.epsilon(..., overflow_prob=eta)`` reports epsilon at the
    requested delta with that slack included. ``accounting.buffer_size``
    chooses the buffer so that the slack is a tiny fraction of delta.

    Args:
      key: typed PRNG key.
      size: int scalar (may be traced), the shard's valid length m < 2^30;
        the shard itself is padded to some static length M >= m.
      rate: float scalar in [0, 1] (may be traced), the sampling rate q.
      buffer: static int B >= 1, the physical batch length.
      return_overflow: static bool; also return whether this draw overflowed.

    Returns:
      idx: [B] int32, sampled indices in increasing order; invalid slots hold
        0 (a safe gather index; mask them with ``valid``).
      valid: [B] bool, idx[k] is a sampled example.
      overflow: bool scalar, only when return_overflow: more than B selected.

    References:
      Abadi et al., "Deep Learning with Differential Privacy", CCS 2016;
      Zhu & Wang, "Poisson Subsampled Renyi Differential Privacy", ICML 2019.
    """
    size = jnp.asarray(size, jnp.int32)
    rate = jnp.asarray(rate, jnp.float32)
    # gap = floor(log(U) / log(1 - q)) for U uniform on (0, 1), with log(U) finite and < 0 and float32's relative
    # resolution at both ends of (0, 1) (rng.dp_log_uniform), so P(gap = 0) = P(U > 1 - q) is accurate to ~1e-7
    # relative even for tiny q. A float32 of 32 random bits reached U = 0 (probability 2^-25): gap = inf ended the
    # batch early, an unaccounted truncation (a 2^-23 grid, as jax.random.uniform gives, would also be off by
    # 2^-23 / q).
    log_keep = jnp.log1p(-jnp.minimum(rate, 1.0))  # log(1 - q), -inf at q = 1
    gap = jnp.floor(rng.dp_log_uniform(key, buffer + 1) / log_keep)  # 0 at q = 1 (finite / -inf = 0)
    # Any gap beyond the shard is as good as infinite; capping keeps the int32
    # cast defined (q = 0 gives inf or nan here).
    cap = (size + 1).astype(jnp.float32)
    gap = jnp.where((rate > 0) & (gap < cap), gap, cap)
    steps = gap.astype(jnp.int32) + 1
    pos = jnp.cumsum(steps) - 1
    # The int32 prefix sum can wrap when buffer * size > 2^31. A float32 copy
    # (relative error < 1e-5) tells where it is still exact: below 2^30 the
    # int32 sum cannot have wrapped, and above 2^30 > size nothing is selected.
    pos_f = jnp.cumsum(steps.astype(jnp.float32))
    selected = (pos_f < 2.0**30) & (pos < size)
    idx = jnp.where(selected[:buffer], pos[:buffer], 0).astype(jnp.int32)
    valid = selected[:buffer]
    if return_overflow:
        return idx, valid, selected[buffer]
    return idx, valid


def privatize_update(key, delta, clip, noise_multiplier, mechanism):
    """Clip a model update and add noise before it leaves the node (update mode).

    Definition:
      gaussian: out = clip_l2(delta, C) + N(0, (z C)^2 I)
      laplace:  out = clip_l1(delta, C) + Lap(b)^D with scale b = z C
    An update with a non-finite entry is replaced by zeros first. The clipped
    update lies in a ball of radius C, so two arbitrary datasets of the node
    give updates at most 2C apart (replace adjacency, the default of
    ``accounting.update_epsilons``); against the node being absent (zero
    update) the distance is C. Each round is one invocation. The bound holds
    whatever un-noised state the node keeps locally (the engine keeps only
    the optimizer state: a node's own row in its aggregation is its noised
    message, not its un-noised model), since
    every possible clipped update lies in the same ball: by joint convexity of
    the hockey-stick divergence (quasi-convexity of the Renyi divergence) the
    per-round guarantee holds conditionally on all earlier messages, so rounds
    compose adaptively. Only the returned vector may leave the node.

    Args:
      key: typed PRNG key, used only for the noise.
      delta: [D] flattened model update.
      clip: scalar C > 0 (L2 radius for gaussian, L1 radius for laplace).
      noise_multiplier: scalar z >= 0.
      mechanism: static str, "gaussian" or "laplace".

    Returns:
      [D], same dtype as delta.

    References:
      Dwork & Roth, "The Algorithmic Foundations of Differential Privacy",
      2014 (Gaussian and Laplace mechanisms); McMahan et al., "Learning
      Differentially Private Recurrent Language Models", ICLR 2018.
    """
    dtype = delta.dtype
    std = _noise_std(noise_multiplier, clip, dtype)
    if mechanism == "gaussian":
        return clip_l2(delta, clip) + std * rng.dp_normal(key, delta.shape, dtype)
    if mechanism == "laplace":
        return clip_l1(delta, clip) + std * rng.dp_laplace(key, delta.shape, dtype)
    raise ValueError(f"privacy.mechanism must be one of {MECHANISMS}, got {mechanism!r}")
