"""Privacy accounting on the host (numpy + Google's dp-accounting), never under jit.

What is accounted, per node (each node protects its own data):

- ``example`` mode (DP-SGD): every local step is one Poisson-subsampled
  Gaussian mechanism with rate q_i = b / m_i and noise multiplier z, under
  add/remove-one adjacency of a single example; a run of R rounds with K local
  steps is R * K compositions (counting rounds instead of steps under-reports
  epsilon by a wide margin). Nodes with smaller shards have larger q_i and
  therefore larger epsilon; the engine reports the maximum over honest nodes.
- ``update`` mode (local DP on messages): every round is one Gaussian (or
  Laplace) mechanism on the node's clipped update, node-level adjacency (the
  node's entire dataset may change). Default ``adjacency="replace"``: any two
  datasets of the node, so the clipped update moves by at most 2C and the
  effective noise multiplier is z / 2. ``adjacency="add_remove"`` (the node's
  data present vs. absent, the absent node sending a zero update) has
  sensitivity C; it is the relation of user-level DP-FedAvg (McMahan et al.
  2018) and is sound here only if an absent node's message would be exactly
  zero, which is why it is not the default.
  Laplace gives pure epsilon-DP per round, eps_round = Delta_1 / b = s / z with
  s = 2 (replace) or 1 (add/remove), composed additively: eps = R s / z,
  delta = 0 but for the noise's finite reach (below); the ``accountant`` does
  not enter.

Accountants: "rdp" (dp-accounting's RdpAccountant, default orders; the
conversion to (eps, delta) is the improved one of Canonne, Kamath & Steinke
2020, Prop. 12 / Asoodeh et al. 2020) and "pld" (dp-accounting's privacy loss
distribution, value_discretization_interval 1e-4, pessimistic estimate; for
q = 1 the exact analytic Gaussian value it approximates is used directly).
Both are upper bounds; PLD is near-tight. Per-step RDP curves and composed
PLDs are cached, so re-reporting after every evaluation costs little.

Buffer overflow in ``poisson_batch`` (see its docstring) is handled by a
total-variation argument: if the implemented run differs from the ideal
Poisson run only on an event of probability at most eta (for both
neighbouring datasets), an ideal (eps, delta')-guarantee gives
(eps, delta' + (1 + e^eps) eta) for the implementation. ``epsilon(...,
overflow_prob=eta)`` reports the smallest eps for which the ideal guarantee
at delta - (1 + e^eps) eta holds, so the reported (eps, delta) covers the
implementation. ``buffer_size`` picks the buffer so the slack is
``fraction`` (default 1e-3) of delta at the expected epsilon.

The noise's finite reach (``jaxdfl.rng``: float32 draws end at T = 11.83
sigma, 72.7 Laplace scales) is charged to delta as well: a release whose
noise is shifted by s noise units (s = 1 / z per DP-SGD step, s / z in
update mode) puts mass P(N > T - s) where the neighbouring dataset's output
cannot reach, an infinite privacy loss. Per release that is at most
q (Pbar(T - s) + 2^40 Pbar(T - 1 / T)) for any split of the shift over up to
2^40 coordinates (:func:`truncation_delta`), added over the releases, and
epsilon is reported at delta minus that charge (infinite once it reaches
delta). At z = 0.5 it is 4e-18 over 10,000 DP-SGD steps at q = 0.01 (4e-16
at q = 1) and 2.4e-11 over 10,000 update-mode rounds; it matters only with
very little noise per release (update mode at a per-round epsilon of about
50 and more).

Recipe for the engine (example mode), once per run on the host:
  1. eps_end = example_epsilons(z, rates, R*K, delta).max(), or the target
     epsilon when calibrating (the buffer does not depend on z).
  2. B = buffer_size(sizes, rates, R*K, delta, eps_end).
  3. eta_i = overflow_probability(sizes_i, rates_i, B, R*K).
  4. report example_epsilons(z, rates, steps_done, delta, overflow_probs=eta);
     calibrate with calibrate_example_noise(..., overflow_probs=eta).

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  Mironov, "Renyi Differential Privacy", CSF 2017; Mironov, Talwar & Zhang,
  "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
  Koskela, Jalko & Honkela, "Computing Tight Differential Privacy Guarantees
  Using FFT", AISTATS 2020; Doroshenko et al., "Connect the Dots", PETS 2022.
  Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy",
  ICML 2018.
"""

import contextlib
import functools
import logging
import math
import warnings

import numpy as np

from jaxdfl.errors import ConfigError

MODES = ("none", "example", "update")
MECHANISMS = ("gaussian", "laplace")
ACCOUNTANTS = ("rdp", "pld")
ADJACENCIES = ("replace", "add_remove")
PLD_DISCRETIZATION = 1e-4
# Below this noise multiplier the PLD's interval grows as (PLD_Z_FULL / z)^2, which keeps its number of bins (and
# time, memory) near z = PLD_Z_FULL's: at a fixed 1e-4, z = 0.1 took minutes and z = 0.01 ran out of memory.
PLD_Z_FULL = 0.5
# Calibration stops when the bracket is this narrow (relative to z).
_CALIBRATION_RTOL = 1e-5
_Z_MAX = 1e6


# ---------------------------------------------------------------- argument checks


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check_delta(delta):
    if not _is_number(delta) or not 0.0 < float(delta) < 1.0:
        raise ConfigError(f"privacy.delta must be a number in (0, 1), got {delta!r}")


def _check_accountant(accountant):
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


#: The noise is drawn in float32: a multiplier must be 0 or within its range (as the config path checks).
_Z_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))


def _check_z(noise_multiplier):
    lo, hi = _Z_RANGE
    if not _is_number(noise_multiplier) or not (noise_multiplier == 0 or lo <= float(noise_multiplier) <= hi):
        raise ConfigError(
            f"privacy.noise_multiplier must be 0 or a number in float32's range [{lo:.3g}, {hi:.3g}], "
            f"got {noise_multiplier!r}"
        )


def _check_steps(steps, name="steps"):
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {steps!r}")


def _check_rate(rate):
    if not _is_number(rate) or not 0.0 <= float(rate) <= 1.0:
        raise ConfigError(f"sample_rate must be a number in [0, 1], got {rate!r}")


def _check_target(target_epsilon):
    if not _is_number(target_epsilon) or not 0.0 < float(target_epsilon) < math.inf:
        raise ConfigError(
            f"privacy.target_epsilon must be a finite number > 0, got {target_epsilon!r}"
        )


def _check_overflow(eta):
    if not _is_number(eta) or not 0.0 <= float(eta) <= 1.0:
        raise ConfigError(f"overflow_prob must be a probability in [0, 1], got {eta!r}")


# ------------------------------------------------------------- cached accountants


@contextlib.contextmanager
def _quiet_absl():
    """Silence dp-accounting's per-order convergence warnings during a call.

    For large q the fractional-order series may not converge; dp-accounting
    then drops that order (the minimum over the remaining orders is still a
    valid bound) and logs a warning, once per call, which floods the log
    during calibration.
    """
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dp():
    """The ``dp_accounting`` package, imported on first use: importing it takes about 2 s (it pulls in
    ``scipy.signal``), which every command and non-private run would otherwise pay."""
    import dp_accounting
    import dp_accounting.pld.privacy_loss_distribution  # noqa: F401
    import dp_accounting.rdp.rdp_privacy_accountant  # noqa: F401

    return dp_accounting


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(z, q):
    """RDP curve of ONE Poisson-subsampled Gaussian step (default orders).

    Composition is additive in RDP, so T steps are T times this vector; this is
    exactly what RdpAccountant.compose does with a SelfComposedDpEvent.
    """
    dp = _dp()
    acc = dp.rdp.RdpAccountant()
    with _quiet_absl():
        acc.compose(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)))
    return acc.orders, acc.rdp


def pld_interval(z: float) -> float:
    """The PLD's value discretization interval for noise multiplier ``z``: :data:`PLD_DISCRETIZATION` from
    :data:`PLD_Z_FULL` up, coarser below. The PLD rounds pessimistically, so a coarser grid gives a looser upper
    bound on epsilon, never an optimistic one."""
    return PLD_DISCRETIZATION * max(1.0, (PLD_Z_FULL / z) ** 2)


@functools.lru_cache(maxsize=16)
def _pld_per_step(z, q):
    return _dp().pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z,
        sampling_prob=q,
        value_discretization_interval=pld_interval(z),
    )


@functools.lru_cache(maxsize=16)
def _pld_composed(z, q, steps):
    return _pld_per_step(z, q).self_compose(steps)


#: Coordinates a release's shift may be split over in :func:`truncation_delta` (2^40: any model that fits).
_MAX_COORDS = 2.0**40


def _normal_tail(x: float) -> float:
    """P(N > x) for a standard normal N."""
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def truncation_delta(shift: float, releases: int, rate: float = 1.0, mechanism: str = "gaussian") -> float:
    """Delta charged for the finite reach of the DP noise draws (``jaxdfl.rng``) over ``releases`` releases.

    Definition: the noise reaches T (:data:`jaxdfl.rng.DP_NORMAL_REACH` or ``DP_LAPLACE_REACH``) per coordinate;
    shifted by the sensitivity, ``shift`` = s noise units (L2 for Gaussian, L1 for Laplace), it leaves mass where
    the neighbour's output never lands. Gaussian: at most ``Pbar(T - s) + 2^40 Pbar(T - 1/T)`` per release for
    any split of the shift over up to 2^40 coordinates (``Pbar(T - sqrt(w))`` is concave in w below 1/T^2 and
    convex above, so one coordinate takes the largest share); Laplace: ``(e^-(T - s) + 2^40 e^-T) / 2`` (convex
    in each coordinate's shift). The releases' charges add up; a Poisson-sampled release (``rate`` q) is shifted
    only when the example is sampled: ``releases * q * charge``.
    """
    from jaxdfl import rng

    if releases == 0 or rate == 0.0:
        return 0.0
    if mechanism == "laplace":
        t = rng.DP_LAPLACE_REACH
        one = 0.5 * (math.exp(-max(t - shift, 0.0)) + _MAX_COORDS * math.exp(-t))
    else:
        t = rng.DP_NORMAL_REACH
        one = _normal_tail(t - shift) + _MAX_COORDS * _normal_tail(t - 1.0 / t)
    return min(1.0, releases * rate * one)


def _eps_at(z, q, steps, accountant):
    """Return delta -> epsilon for T Poisson-subsampled Gaussian steps (no overflow), the noise's finite reach
    charged to delta (:func:`truncation_delta`)."""
    if steps == 0 or q == 0.0:
        return lambda delta: 0.0
    if z == 0.0:
        return lambda delta: math.inf
    charge = truncation_delta(1.0 / z, steps, q)
    # The accountant is asked only when delta survives the charge: below, epsilon is inf whatever it says (and at
    # tiny z dp-accounting's PLD overflows).
    return lambda delta: _eps_ideal(z, q, steps, accountant)(delta - charge) if delta > charge else math.inf


def _eps_ideal(z, q, steps, accountant):
    """Return delta -> epsilon for T Poisson-subsampled Gaussian steps with untruncated noise."""
    if accountant == "pld" and q == 1.0:
        # Unsubsampled Gaussian: T compositions are one Gaussian with z /
        # sqrt(T), whose exact epsilon (Balle & Wang 2018) is what the PLD
        # approximates (they agree to ~7 digits); the PLD itself is slow here.
        sigma = z / math.sqrt(steps)
        return lambda delta: float(_dp().get_epsilon_gaussian(sigma, delta))
    if accountant == "rdp":
        orders, rdp = _rdp_per_step(z, q)
        total = steps * rdp
        rdp_epsilon = _dp().rdp.rdp_privacy_accountant.compute_epsilon

        def from_rdp(delta):
            with _quiet_absl():  # its "negative Renyi divergence, returning 0" warnings at huge z
                return float(rdp_epsilon(orders, total, delta)[0])

        return from_rdp
    try:
        pld = _pld_composed(z, q, steps)
    except OverflowError:  # a privacy loss beyond float64 (tiny z): no finite epsilon
        return lambda delta: math.inf
    return lambda delta: float(pld.get_epsilon_for_delta(delta))


def _with_margin(guess):
    """The guess plus a margin, so that :func:`_with_overflow`'s fixed-point iteration ends in a few steps."""
    return guess + 1e-9 * max(1.0, guess)


def _negligible(eta, delta, eps_bound):
    """Whether overflow ``eta`` leaves :func:`_with_overflow` at exactly its eta = 0 value for every epsilon up to
    ``eps_bound``: its first charge ``(1 + e^g) eta`` does not change ``delta`` in floating point."""
    try:
        return delta - (1.0 + math.exp(_with_margin(eps_bound))) * eta == delta
    except OverflowError:
        return False


def _with_overflow(eps_fn, delta, eta):
    """Smallest reported eps covering the (1 + e^eps) eta total-variation slack.

    Invariant on return e: the ideal mechanism is (e, delta - s)-DP with
    s = (1 + e^g) eta for some g >= e, so the implementation is
    (e, delta - s + (1 + e^e) eta) <= (e, delta)-DP.
    """
    if eta == 0.0:
        return eps_fn(delta)
    guess = eps_fn(delta)
    for _ in range(100):
        if not math.isfinite(guess):
            return math.inf
        guess = _with_margin(guess)
        try:
            slack = (1.0 + math.exp(guess)) * eta
        except OverflowError:
            return math.inf
        if slack >= delta:
            return math.inf
        eps = eps_fn(delta - slack)
        if eps <= guess:
            return eps
        guess = eps
    return math.inf


# --------------------------------------------------------------------- public API


def epsilon(noise_multiplier, sample_rate, steps, delta, accountant="rdp", overflow_prob=0.0):
    """Epsilon of DP-SGD: ``steps`` Poisson-subsampled Gaussian steps, add/remove-one.

    Definition: the (eps, delta)-DP guarantee of the T-fold composition of
    M(D) = sum_{x in S} f(x) + N(0, z^2 I), S Poisson-sampled from D with rate
    q and ||f(x)||_2 <= 1, reported at ``delta``. With ``overflow_prob`` eta
    > 0, the smallest eps such that the ideal run is (eps, delta - (1 + e^eps)
    eta)-DP (see the module docstring), covering a fixed-buffer implementation
    that overflows with probability at most eta over the run.

    Args:
      noise_multiplier: z >= 0 (z = 0 gives inf unless nothing is released).
      sample_rate: q in [0, 1].
      steps: T >= 0, total number of noisy steps (rounds x local steps).
      delta: target delta in (0, 1).
      accountant: "rdp" or "pld".
      overflow_prob: eta in [0, 1], the probability that any step's batch
        overflowed its buffer (``overflow_probability``).

    Returns:
      float epsilon (math.inf when no finite epsilon holds).

    References:
      Mironov, Talwar & Zhang 2019 (sampled Gaussian RDP); Koskela et al. 2020
      and Doroshenko et al. 2022 (PLD).
    """
    _check_z(noise_multiplier)
    _check_rate(sample_rate)
    _check_steps(steps)
    _check_delta(delta)
    _check_accountant(accountant)
    _check_overflow(overflow_prob)
    fn = _eps_at(float(noise_multiplier), float(sample_rate), int(steps), accountant)
    return _with_overflow(fn, float(delta), float(overflow_prob))


def _bisect_smallest_z(eps_of_z, target, z_start, factor):
    """Smallest z (to _CALIBRATION_RTOL) with eps_of_z(z) <= target; eps decreasing in z."""
    hi = z_start
    while eps_of_z(hi) > target:
        hi *= factor
        if hi > _Z_MAX:
            return None
    lo = hi / factor
    while eps_of_z(lo) <= target:
        hi, lo = lo, lo / factor
        if lo < 1e-6:
            return hi
    # Brent's method on the bracket, then step up to a feasible point: PLD
    # estimates are piecewise constant on a fine scale, so the root is
    # approximate and feasibility is checked, not assumed.
    xtol = _CALIBRATION_RTOL * hi
    from scipy import optimize  # imported on use, as dp_accounting: scipy.stats/optimize take ~1 s to import

    z = optimize.brentq(lambda x: eps_of_z(x) - target, lo, hi, xtol=xtol)
    while eps_of_z(z) > target:
        z = min(z + xtol, hi)
    return z


def calibrate_noise(target_epsilon, sample_rate, steps, delta, accountant="rdp", overflow_prob=0.0):
    """Smallest noise multiplier z with ``epsilon(z, ...) <= target_epsilon``.

    Definition: z* = min { z >= 0 : epsilon(z, q, T, delta) <= target }, found
    by bracketing and Brent's method to relative precision 1e-5, then checked
    (the returned z always meets the target).

    Args:
      target_epsilon: eps > 0.
      sample_rate: q in [0, 1].
      steps: T >= 0 noisy steps.
      delta: target delta in (0, 1).
      accountant: "rdp" or "pld".
      overflow_prob: eta, as in ``epsilon``.

    Returns:
      float z (0.0 when nothing is released: T = 0 or q = 0).

    Raises:
      ConfigError naming privacy.target_epsilon when no z <= 1e6 meets it.

    References:
      Abadi et al. 2016; Mironov, Talwar & Zhang 2019.
    """
    _check_target(target_epsilon)
    _check_rate(sample_rate)
    _check_steps(steps)
    _check_delta(delta)
    _check_accountant(accountant)
    _check_overflow(overflow_prob)
    return _calibrate([(float(sample_rate), int(steps), float(overflow_prob))], float(target_epsilon),
                      float(delta), accountant)


def _calibrate(triples, target, delta, accountant):
    """Smallest z keeping every (rate, steps, eta) triple within target (eps monotone in z)."""
    triples = [(q, t, e) for q, t, e in triples if q > 0 and t > 0]
    if not triples:
        return 0.0

    def worst(z):
        return _largest(z, triples, delta, accountant)

    # Start PLD from the (cheap, looser) RDP answer with a narrow bracket, so
    # PLD (about a second per call) is never evaluated at small z where it is
    # slow; the two accountants differ by a few percent in z.
    start, factor = 1.0, 2.0
    if accountant == "pld":
        start = _calibrate(triples, target, delta, "rdp")
        factor = 1.1
    z = _bisect_smallest_z(worst, target, start, factor)
    if z is None:
        raise ConfigError(
            f"privacy.target_epsilon = {target} is unreachable at privacy.delta = {delta} "
            f"with noise_multiplier <= {_Z_MAX:g} (raise the target or delta, or take fewer steps)"
        )
    return float(z)


def _per_node(values, n, name):
    arr = np.asarray(values)
    if arr.ndim == 0:
        return np.full(n, arr.item())
    if arr.shape != (n,):
        raise ConfigError(f"{name} must be a scalar or have shape [{n}], got {arr.shape}")
    return arr


def _accounted_rates(sample_rates):
    """float64 rates, rounded up to the float32 value the sampler compares with.

    The jitted sampler sees float32(q); if that rounds above q, account the
    larger value so the reported epsilon stays an upper bound.
    """
    q = np.asarray(sample_rates, dtype=np.float64).reshape(-1)
    return np.maximum(q, q.astype(np.float32).astype(np.float64))


def _pareto_max(triples):
    """The (q, T, eta) triples no other triple dominates (>= in all three): epsilon increases in each, so the
    largest epsilon over all triples is among these."""
    kept = []
    for q, t, e in sorted(set(triples), reverse=True):  # q descending: only later triples can be dominated
        if not any(t2 >= t and e2 >= e for _, t2, e2 in kept):
            kept.append((q, t, e))
    return kept


def _largest(z, triples, delta, accountant):
    """``max epsilon(z, q, T, delta, accountant, eta)`` over the (q, T, eta) triples, computed for the
    Pareto-maximal ones after dropping the etas too small to matter (:func:`_negligible`, bounded by the epsilon of
    the largest q and T): the overflow probability grows with the shard size while q shrinks, so otherwise every
    large shard would be Pareto-maximal. Typically one accountant call, whatever the number of shard sizes."""
    bound = _eps_at(z, max(q for q, _, _ in triples), max(t for _, t, _ in triples), accountant)(delta)
    triples = [(q, t, 0.0 if _negligible(e, delta, bound) else e) for q, t, e in triples]
    return max(_with_overflow(_eps_at(z, q, int(t), accountant), delta, e) for q, t, e in _pareto_max(triples))


def _node_triples(sample_rates, steps, overflow_probs, name):
    """Per-node (q_i rounded up to float32, T_i, eta_i) triples, each checked."""
    if np.ndim(sample_rates) > 1:
        raise ConfigError(f"sample_rates must be a number or a 1-D array of per-node rates, got shape "
                          f"{np.shape(sample_rates)}")
    rates = _accounted_rates(sample_rates)
    n = rates.shape[0]
    steps = _per_node(steps, n, name)
    if steps.dtype == bool or not np.issubdtype(steps.dtype, np.integer):
        raise ConfigError(f"{name} must be an integer >= 0 or [N] such integers, got {steps.dtype} values")
    etas = _per_node(overflow_probs, n, "overflow_probs").astype(np.float64)
    triples = list(zip(rates.tolist(), steps.tolist(), etas.tolist()))
    for q, t, e in triples:
        _check_rate(q)
        _check_steps(t, name)
        _check_overflow(e)
    return triples


def example_epsilon_max(noise_multiplier, sample_rates, steps_done, delta, accountant="rdp", overflow_probs=0.0):
    """``max(example_epsilons(...))`` (same arguments; 0.0 for no nodes), from the nodes that can hold it only
    (:func:`_largest`): its cost does not grow with the number of distinct shard sizes."""
    _check_z(noise_multiplier)
    _check_delta(delta)
    _check_accountant(accountant)
    triples = _node_triples(sample_rates, steps_done, overflow_probs, "steps_done")
    return _largest(float(noise_multiplier), triples, float(delta), accountant) if triples else 0.0


def example_epsilons(noise_multiplier, sample_rates, steps_done, delta, accountant="rdp",
                     overflow_probs=0.0):
    """Per-node epsilon in ``example`` mode (DP-SGD), cached over identical nodes.

    Definition: eps_i = epsilon(z, q_i, T_i, delta, accountant, eta_i) with
    q_i rounded up to its float32 value (what the sampler uses). Nodes with
    identical (q_i, T_i, eta_i) share one accountant call, so 1000 nodes with
    equal shards cost one call; RDP curves are also cached across calls, so
    re-reporting after every evaluation is cheap.

    Args:
      noise_multiplier: z >= 0.
      sample_rates: [N] rates q_i = b / m_i.
      steps_done: int or [N] ints, noisy steps taken so far (rounds x K).
      delta: target delta in (0, 1).
      accountant: "rdp" or "pld".
      overflow_probs: float or [N], eta_i from ``overflow_probability``.

    Returns:
      np.ndarray [N] float64 of epsilons; the engine reports its max over
      honest nodes.
    """
    _check_z(noise_multiplier)
    _check_delta(delta)
    _check_accountant(accountant)
    keys = _node_triples(sample_rates, steps_done, overflow_probs, "steps_done")
    cache = {}
    for k in set(keys):
        q, t, e = k
        cache[k] = epsilon(float(noise_multiplier), q, int(t), delta, accountant, e)
    return np.array([cache[k] for k in keys], dtype=np.float64)


def calibrate_example_noise(target_epsilon, sample_rates, steps, delta, accountant="rdp",
                            overflow_probs=0.0):
    """Smallest z keeping every node's example-mode epsilon within the target.

    Definition: z* = min { z : max_i epsilon(z, q_i, T_i, delta) <= target },
    rates rounded up to float32 as in ``example_epsilons``.

    Args:
      target_epsilon: eps > 0.
      sample_rates: [N] rates q_i.
      steps: int or [N] ints, total noisy steps of the run.
      delta: target delta in (0, 1).
      accountant: "rdp" or "pld".
      overflow_probs: float or [N], eta_i.

    Returns:
      float z.

    Raises:
      ConfigError naming privacy.target_epsilon when unreachable.
    """
    _check_target(target_epsilon)
    _check_delta(delta)
    _check_accountant(accountant)
    triples = _node_triples(sample_rates, steps, overflow_probs, "steps")
    return _calibrate(triples, float(target_epsilon), float(delta), accountant)


def _sensitivity_factor(adjacency):
    if adjacency not in ADJACENCIES:
        raise ConfigError(f"privacy.adjacency must be one of {ADJACENCIES}, got {adjacency!r}")
    return 2.0 if adjacency == "replace" else 1.0


def _check_mechanism(mechanism):
    if mechanism not in MECHANISMS:
        raise ConfigError(f"privacy.mechanism must be one of {MECHANISMS}, got {mechanism!r}")


def update_epsilons(noise_multiplier, rounds_done, delta, mechanism="gaussian", accountant="rdp",
                    adjacency="replace"):
    """Node-level epsilon in ``update`` mode after ``rounds_done`` noisy messages.

    Definition (s = 2 for adjacency "replace", 1 for "add_remove"; the clipped
    update has sensitivity s C and the noise scale is z C):
      gaussian: R Gaussian mechanisms with multiplier z / s, composed by the
        accountant (at delta);
      laplace: pure epsilon-DP, R * s / z, but for the noise's finite reach
        (:func:`truncation_delta`; inf once that charge exceeds delta; the
        accountant is unused).

    Args:
      noise_multiplier: z >= 0.
      rounds_done: R >= 0 rounds whose messages were released.
      delta: target delta in (0, 1) (unused for laplace).
      mechanism: "gaussian" or "laplace".
      accountant: "rdp" or "pld".
      adjacency: "replace" (default, conservative) or "add_remove".

    Returns:
      float epsilon, the same for every node (no subsampling at node level).

    References:
      Dwork & Roth 2014 (Laplace, basic composition); Balle & Wang 2018;
      McMahan et al., ICLR 2018 (user-level adjacency).
    """
    _check_z(noise_multiplier)
    _check_steps(rounds_done, "rounds_done")
    _check_delta(delta)
    _check_mechanism(mechanism)
    _check_accountant(accountant)
    s = _sensitivity_factor(adjacency)
    z = float(noise_multiplier)
    if mechanism == "laplace":
        if rounds_done == 0:
            return 0.0
        if z == 0.0 or truncation_delta(s / z, int(rounds_done), mechanism="laplace") > delta:
            return math.inf
        return rounds_done * s / z
    return _eps_at(z / s, 1.0, int(rounds_done), accountant)(float(delta))  # epsilon(z / s, ...), checked above


def calibrate_update_noise(target_epsilon, rounds, delta, mechanism="gaussian", accountant="rdp",
                           adjacency="replace"):
    """Smallest z meeting ``target_epsilon`` for ``rounds`` messages in update mode.

    Definition: gaussian: s * calibrate_noise(target, 1, R, delta); laplace:
    z = R s / target in closed form (pure epsilon; delta is not used).

    Args:
      target_epsilon: eps > 0.
      rounds: R >= 0 rounds of the run.
      delta: target delta in (0, 1) (unused for laplace).
      mechanism: "gaussian" or "laplace".
      accountant: "rdp" or "pld".
      adjacency: "replace" or "add_remove".

    Returns:
      float z.

    Raises:
      ConfigError naming privacy.target_epsilon when unreachable.
    """
    _check_target(target_epsilon)
    _check_steps(rounds, "rounds")
    _check_delta(delta)
    _check_mechanism(mechanism)
    _check_accountant(accountant)
    s = _sensitivity_factor(adjacency)
    if mechanism == "laplace":
        z = rounds * s / float(target_epsilon)
        if rounds and truncation_delta(s / z, int(rounds), mechanism="laplace") > delta:
            raise ConfigError(f"privacy.target_epsilon = {target_epsilon:g} over {rounds} rounds is more than "
                              "float32 Laplace noise can give (its draws end at 72.7 scales, so a per-round "
                              "epsilon near that fails delta); lower the target or run more rounds")
        return z
    return s * calibrate_noise(target_epsilon, 1.0, rounds, delta, accountant)


# ------------------------------------------------------------------ buffer overflow


def _check_sizes_rates(sizes, rates):
    m, q = np.asarray(sizes), np.asarray(rates)
    if m.dtype == bool or not np.issubdtype(m.dtype, np.integer) or np.any(m < 0):
        raise ConfigError(f"sizes must be integer shard sizes >= 0, got {sizes!r}")
    if not np.issubdtype(q.dtype, np.number) or not np.all((q >= 0.0) & (q <= 1.0)):
        raise ConfigError(f"rates must be sampling rates in [0, 1], got {rates!r}")


def overflow_probability(sizes, rates, buffer, steps):
    """Probability that any of ``steps`` Poisson batches overflows ``buffer``.

    Definition (per node, union bound over steps, Binomial(m + 1, q) so that
    the add-one neighbour of the shard is covered too):
      eta = min(1, T * P[Binomial(m + 1, q) > B]).

    Args:
      sizes: int or [N] shard sizes m_i.
      rates: float or [N] sampling rates q_i.
      buffer: B, the static buffer length.
      steps: T, number of sampled steps.

    Returns:
      float for scalar inputs, else np.ndarray [N].
    """
    from scipy import stats

    _check_sizes_rates(sizes, rates)
    _check_steps(buffer, "buffer")
    _check_steps(steps)
    m = np.asarray(sizes, dtype=np.int64)
    q = _accounted_rates(rates).reshape(np.shape(rates))
    tail = np.exp(stats.binom.logsf(int(buffer), m + 1, q))
    eta = np.minimum(1.0, steps * tail)
    return float(eta) if eta.ndim == 0 else eta


def buffer_size(sizes, rates, steps, delta, epsilon, fraction=1e-3, eta=None):
    """Smallest static buffer B whose overflow slack is a ``fraction`` of delta.

    Definition: eta = fraction * delta / (1 + e^epsilon) unless given, and
    B = min { B : overflow_probability(m_i, q_i, B, T) <= eta for every i }.
    With this B, ``epsilon(..., overflow_prob=eta_i)`` is within a hair of the
    overflow-free value (delta is reduced by about ``fraction``). For
    epsilon = inf (no privacy) eta = fraction * delta.

    Args:
      sizes: int or [N] shard sizes m_i.
      rates: float or [N] sampling rates q_i.
      steps: T, noisy steps of the whole run.
      delta: the run's delta.
      epsilon: the expected (or target) epsilon at the end of the run.
      fraction: share of delta the overflow may cost.
      eta: optional explicit bound on the per-run overflow probability.

    Returns:
      int B >= 1 (at most max(m_i) + 1, where overflow is impossible).
    """
    from scipy import stats

    _check_sizes_rates(sizes, rates)
    _check_steps(steps)
    _check_delta(delta)
    if not _is_number(epsilon) or not float(epsilon) >= 0.0:
        raise ConfigError(f"epsilon must be a number >= 0 (inf allowed), got {epsilon!r}")
    if not _is_number(fraction) or not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if eta is not None:
        _check_overflow(eta)
    m = np.atleast_1d(np.asarray(sizes, dtype=np.int64))
    q = np.atleast_1d(_accounted_rates(rates))
    m, q = np.broadcast_arrays(m, q)
    if eta is None:
        eta = fraction * delta
        if math.isfinite(epsilon):
            eta = eta / (1.0 + math.exp(min(epsilon, 700.0)))
    if eta <= 0.0:
        return int(m.max()) + 1
    log_eta = math.log(eta) - math.log(max(int(steps), 1))
    best = 1
    for mi, qi in set(zip(m.tolist(), q.tolist())):
        lo, hi = 0, mi + 1  # P[Bin(m+1, q) > m+1] = 0, so hi is always feasible.
        while lo < hi:
            mid = (lo + hi) // 2
            if stats.binom.logsf(mid, mi + 1, qi) <= log_eta:
                hi = mid
            else:
                lo = mid + 1
        best = max(best, lo)
    return int(best)


# ----------------------------------------------------------------------- validation


def validate(mode, mechanism, clip_norm, noise_multiplier, target_epsilon, delta, accountant,
             min_shard_size=None):
    """Check the ``[privacy]`` settings on the host; raise ConfigError, warn on weak delta.

    Rules: mode in MODES; with mode "none" nothing else is checked. Otherwise
    mechanism in MECHANISMS ("laplace" only with mode "update": DP-SGD here is
    the subsampled Gaussian), accountant in ACCOUNTANTS, delta in (0, 1),
    clip_norm > 0 (inf only with noise_multiplier = 0, a non-private debug
    setting), exactly one of noise_multiplier (finite, >= 0) and
    target_epsilon (finite, > 0). Warns when delta >= 1 / min_shard_size in
    example mode (a mechanism that publishes one random example outright is
    (0, 1/m)-DP, so such a delta is meaningless) and when z = 0 (epsilon is
    infinite).

    Args:
      mode, mechanism, accountant: config strings.
      clip_norm: C.
      noise_multiplier: z, or None when target_epsilon is set.
      target_epsilon: target, or None when noise_multiplier is set.
      delta: delta.
      min_shard_size: smallest honest shard size, or None if unknown.

    Returns:
      None.
    """
    if mode not in MODES:
        raise ConfigError(f"privacy.mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return
    _check_mechanism(mechanism)
    if mechanism == "laplace" and mode != "update":
        raise ConfigError(
            "privacy.mechanism = 'laplace' requires privacy.mode = 'update' "
            "(example mode is DP-SGD with the subsampled Gaussian mechanism)"
        )
    _check_accountant(accountant)
    _check_delta(delta)
    if not _is_number(clip_norm) or not float(clip_norm) > 0.0 or math.isnan(float(clip_norm)):
        raise ConfigError(f"privacy.clip_norm must be a number > 0, got {clip_norm!r}")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError(
            "privacy.noise_multiplier and privacy.target_epsilon: set exactly one of them "
            f"(got noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r})"
        )
    if target_epsilon is not None:
        _check_target(target_epsilon)
        if math.isinf(float(clip_norm)):
            raise ConfigError("privacy.clip_norm must be finite when privacy.target_epsilon is set")
    else:
        _check_z(noise_multiplier)
        if float(noise_multiplier) > 0.0 and math.isinf(float(clip_norm)):
            raise ConfigError(
                "privacy.clip_norm must be finite when privacy.noise_multiplier > 0 "
                "(noise scale is noise_multiplier * clip_norm)"
            )
        if float(noise_multiplier) == 0.0:
            warnings.warn(
                "privacy.noise_multiplier = 0 adds no noise: epsilon is infinite", stacklevel=2
            )
    if mode == "example" and min_shard_size is not None and min_shard_size > 0:
        if float(delta) >= 1.0 / min_shard_size:
            warnings.warn(
                f"privacy.delta = {delta} is >= 1/m = {1.0 / min_shard_size:.3g} for the smallest "
                f"shard (m = {min_shard_size}); choose delta well below 1/m",
                stacklevel=2,
            )
