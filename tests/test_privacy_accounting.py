"""Tests for the host-side accountant in jaxdfl.privacy.accounting.

Oracles: the reference table of ../shared/REFERENCE.md (dp-accounting 0.6.0,
delta = 1e-5, add/remove-one), the exact analytic Gaussian mechanism of
Balle & Wang (2018) re-implemented below from its definition, and the
definitions of composition and sensitivity.
"""

import math
import warnings

import dp_accounting
import numpy as np
import pytest
from scipy import optimize
from scipy import stats

from jaxdfl.errors import ConfigError
from jaxdfl.privacy import accounting
from jaxdfl.privacy import buffer_size
from jaxdfl.privacy import calibrate_example_noise
from jaxdfl.privacy import calibrate_noise
from jaxdfl.privacy import calibrate_update_noise
from jaxdfl.privacy import epsilon
from jaxdfl.privacy import example_epsilons
from jaxdfl.privacy import overflow_probability
from jaxdfl.privacy import update_epsilons
from jaxdfl.privacy import validate

DELTA = 1e-5

# (q, z, T, RDP epsilon, PLD epsilon) from REFERENCE.md.
REFERENCE = [
    (0.01, 1.1, 10_000, 5.6320, 5.1926),
    (1.0, 1.0, 100, 96.1163, 91.8173),
    (0.01, 4.0, 10_000, 1.0355, 0.9470),
    (0.01, 2.0, 10_000, 2.3529, 2.1628),
    (256 / 60000, 1.12, 14_062, 2.5186, 2.3102),
]


def analytic_gaussian_epsilon(sigma_over_sensitivity, delta):
    """Exact epsilon of one Gaussian mechanism (Balle & Wang 2018, Thm. 8).

    delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s), s = sigma/Delta;
    solved for eps with Brent's method.
    """
    s = sigma_over_sensitivity

    def gap(eps):
        a = stats.norm.logcdf(1 / (2 * s) - eps * s)
        b = eps + stats.norm.logcdf(-1 / (2 * s) - eps * s)
        return a + np.log1p(-np.exp(b - a)) - np.log(delta)

    hi = 1.0
    while gap(hi) > 0:
        hi *= 2
    return optimize.brentq(gap, 0.0, hi, xtol=1e-12)


# --------------------------------------------------------------- reference values


@pytest.mark.parametrize("q,z,steps,rdp_ref,pld_ref", REFERENCE)
@pytest.mark.parametrize("acct", ["rdp", "pld"])
def test_epsilon_matches_reference_table(q, z, steps, rdp_ref, pld_ref, acct):
    ref = rdp_ref if acct == "rdp" else pld_ref
    assert epsilon(z, q, steps, DELTA, acct) == pytest.approx(ref, abs=1e-4)


def test_full_batch_equals_exact_analytic_gaussian():
    # T full-batch steps with z = one Gaussian with z / sqrt(T).
    exact = analytic_gaussian_epsilon(1.0 / math.sqrt(100), DELTA)
    assert exact == pytest.approx(91.8173, abs=1e-4)
    assert epsilon(1.0, 1.0, 100, DELTA, "pld") == pytest.approx(exact, rel=1e-7)
    # RDP is an upper bound on the exact value, and composes exactly: T steps
    # at z have the same RDP curve as one step at z / sqrt(T).
    assert epsilon(1.0, 1.0, 100, DELTA, "rdp") >= exact
    assert epsilon(1.0, 1.0, 100, DELTA, "rdp") == pytest.approx(
        accounting._eps_ideal(0.1, 1.0, 1, "rdp")(DELTA), rel=1e-9)
    # ... for ideal noise: float32 draws end at 11.83 sigma, and one release shifted by 10 sigma puts P(N > 1.83)
    # = 3% where the neighbour cannot land, far above delta (:func:`accounting.truncation_delta`)
    assert epsilon(0.1, 1.0, 1, DELTA, "rdp") == math.inf
    # Single-shot reference: sigma / Delta = 3.7306 gives epsilon 1.
    assert epsilon(3.7306, 1.0, 1, DELTA, "pld") == pytest.approx(1.0, abs=1e-4)
    assert analytic_gaussian_epsilon(3.7306, DELTA) == pytest.approx(1.0, abs=1e-4)


def test_local_steps_times_rounds_equals_total_steps():
    # K = 5 local steps x R = 2000 rounds, composed as nested events by
    # dp-accounting itself, equals T = 10,000 single steps (5.632).
    step = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))
    nested = dp_accounting.SelfComposedDpEvent(dp_accounting.SelfComposedDpEvent(step, 5), 2000)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(nested)
    assert acc.get_epsilon(DELTA) == pytest.approx(epsilon(1.1, 0.01, 5 * 2000, DELTA), rel=1e-12)
    assert example_epsilons(1.1, [0.01], 5 * 2000, DELTA)[0] == pytest.approx(5.632, abs=1e-3)
    # Counting rounds instead of steps would report far less.
    assert epsilon(1.1, 0.01, 2000, DELTA) < 0.5 * 5.632


def test_monotone_in_every_argument():
    base = epsilon(1.0, 0.01, 1000, DELTA)
    assert epsilon(1.2, 0.01, 1000, DELTA) < base
    assert epsilon(1.0, 0.02, 1000, DELTA) > base
    assert epsilon(1.0, 0.01, 2000, DELTA) > base
    assert epsilon(1.0, 0.01, 1000, 1e-6) > base
    assert epsilon(0.0, 0.01, 1000, DELTA) == math.inf
    assert epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert epsilon(1.0, 0.0, 1000, DELTA) == 0.0


# -------------------------------------------------------------------- calibration


@pytest.mark.parametrize("acct,ref", [
    ("rdp", 0.9169),
    pytest.param("pld", 0.8825, marks=pytest.mark.slow),  # ~7 PLD builds, 10-20 s
])
def test_calibration_reference(acct, ref):
    z = calibrate_noise(8.0, 0.01, 10_000, DELTA, acct)
    assert z == pytest.approx(ref, abs=1e-4)
    assert epsilon(z, 0.01, 10_000, DELTA, acct) <= 8.0
    # Smallest: 1e-4 less noise misses the target.
    assert epsilon(z - 1e-4, 0.01, 10_000, DELTA, acct) > 8.0


def test_calibration_unreachable_names_the_key():
    # RDP with its finite orders cannot certify eps = 1e-3 at delta = 1e-5.
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        calibrate_noise(1e-3, 1.0, 10_000, DELTA)
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        calibrate_noise(0.0, 0.01, 100, DELTA)
    # Overflow slack alone larger than delta: unreachable too.
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        calibrate_noise(1.0, 0.01, 100, DELTA, overflow_prob=DELTA)
    assert calibrate_noise(1.0, 0.01, 0, DELTA) == 0.0


# ------------------------------------------------------------- per-node (example)


def test_heterogeneous_shards_reference_and_cache():
    rates = [32 / 500, 32 / 10_000]
    eps = example_epsilons(1.0, rates, 2000, DELTA)
    assert eps[0] == pytest.approx(24.1, abs=0.05)
    assert eps[1] == pytest.approx(1.07, abs=0.005)
    # 1000 nodes with equal shards cost one accountant call.
    accounting._rdp_per_step.cache_clear()
    many = example_epsilons(1.3, np.full(1000, 0.02), 500, DELTA)
    assert accounting._rdp_per_step.cache_info().misses == 1
    assert np.all(many == many[0]) and many.shape == (1000,)
    # Per-node steps are honoured.
    mixed = example_epsilons(1.0, rates, [2000, 100], DELTA)
    assert mixed[0] == eps[0] and mixed[1] < eps[1]


def test_the_largest_epsilon_comes_from_the_pareto_maximal_nodes_only():
    """history["epsilon"] once ran the accountant for every distinct shard size at every evaluation."""
    rng = np.random.default_rng(3)
    rates = 16 / rng.integers(300, 4000, 12)
    steps = rng.choice([150, 200], 12)
    etas = rng.choice([0.0, 1e-12, 1e-11], 12)
    triples = accounting._node_triples(rates, steps, etas, "steps")
    brute = {a for a in triples if not any(b != a and all(y >= x for x, y in zip(a, b)) for b in triples)}
    kept = accounting._pareto_max(triples)
    assert set(kept) == brute and len(kept) < len(set(triples))
    assert accounting.example_epsilon_max(1.1, rates, steps, DELTA, overflow_probs=etas) == \
        example_epsilons(1.1, rates, steps, DELTA, overflow_probs=etas).max()


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_overflow_too_small_to_change_delta_costs_no_accountant_call(accountant):
    """The overflow probability grows with the shard size while q shrinks, so every large shard was Pareto-maximal
    (127 of 142 nodes of a synthetic N = 256 run): etas that cannot change delta are dropped first, exactly."""
    sizes = np.arange(300, 306)
    rates, etas = 16 / sizes, 1e-40 * sizes.astype(float)
    etas[3] = 1e-7  # one that matters is kept
    accounting._rdp_per_step.cache_clear()
    accounting._pld_per_step.cache_clear()
    top = accounting.example_epsilon_max(1.3, rates, 60, DELTA, accountant, etas)
    calls = (accounting._rdp_per_step if accountant == "rdp" else accounting._pld_per_step).cache_info().misses
    assert calls == 2  # the largest q (which also bounds every epsilon) and the node with a large eta
    assert top == example_epsilons(1.3, rates, 60, DELTA, accountant, etas).max()
    clean = example_epsilons(1.3, rates, 60, DELTA, accountant)
    np.testing.assert_array_equal(np.delete(example_epsilons(1.3, rates, 60, DELTA, accountant, etas), 3),
                                  np.delete(clean, 3))


def test_example_epsilons_account_the_float32_rate_the_sampler_sees():
    # Find a rate whose float32 rounding is above it: the accountant must use
    # the larger value so the report stays an upper bound.
    q = next(x for x in (32 / 6001 + k * 1e-9 for k in range(100))
             if float(np.float32(x)) > x)
    got = example_epsilons(1.0, [q], 1000, DELTA)[0]
    assert got == epsilon(1.0, float(np.float32(q)), 1000, DELTA)
    assert got > epsilon(1.0, q, 1000, DELTA)


def test_calibrate_example_noise_binds_on_the_smallest_shard():
    rates = [32 / 500, 32 / 2000, 32 / 10_000]
    z = calibrate_example_noise(8.0, rates, 2000, DELTA)
    assert z == pytest.approx(calibrate_noise(8.0, float(np.float32(32 / 500)), 2000, DELTA), rel=1e-9)
    eps = example_epsilons(z, rates, 2000, DELTA)
    assert eps.max() <= 8.0 and eps.max() == pytest.approx(8.0, abs=1e-3)


# ----------------------------------------------------------------------- update


def test_update_mode_gaussian_against_analytic_and_adjacency():
    z, rounds = 3.0, 50
    # Replace adjacency: sensitivity 2C, noise zC -> sigma/Delta = z/2, R-fold.
    exact_replace = analytic_gaussian_epsilon(z / 2 / math.sqrt(rounds), DELTA)
    exact_add = analytic_gaussian_epsilon(z / math.sqrt(rounds), DELTA)
    assert update_epsilons(z, rounds, DELTA, accountant="pld") == pytest.approx(exact_replace, rel=1e-6)
    assert update_epsilons(z, rounds, DELTA, accountant="pld", adjacency="add_remove") == pytest.approx(
        exact_add, rel=1e-6)
    assert update_epsilons(z, rounds, DELTA) >= exact_replace  # RDP upper bound
    assert update_epsilons(z, 0, DELTA) == 0.0
    # Calibration inverts it and is the smallest.
    zc = calibrate_update_noise(4.0, rounds, DELTA)
    assert update_epsilons(zc, rounds, DELTA) <= 4.0 < update_epsilons(zc * (1 - 1e-4), rounds, DELTA)


def test_update_mode_laplace_is_pure_and_additive():
    # eps per round = Delta_1 / b = 2C / (zC) under replace, C / (zC) add/remove.
    assert update_epsilons(4.0, 10, DELTA, "laplace") == pytest.approx(10 * 2 / 4.0)
    assert update_epsilons(4.0, 10, DELTA, "laplace", adjacency="add_remove") == pytest.approx(10 / 4.0)
    assert update_epsilons(0.0, 10, DELTA, "laplace") == math.inf
    z = calibrate_update_noise(5.0, 10, DELTA, "laplace")
    assert update_epsilons(z, 10, DELTA, "laplace") == pytest.approx(5.0)
    with pytest.raises(ConfigError, match="privacy.adjacency"):
        update_epsilons(1.0, 10, DELTA, adjacency="swap")


# --------------------------------------------------------------------- overflow


def test_overflow_probability_and_buffer_size():
    m, q, steps = 500, 32 / 500, 2000
    direct = min(1.0, steps * stats.binom.sf(60, m + 1, np.float32(q).astype(np.float64)))
    assert overflow_probability(m, q, 60, steps) == pytest.approx(direct, rel=1e-9)
    eta = 1e-3 * DELTA / (1 + math.exp(8.0))
    b = buffer_size(m, q, steps, DELTA, 8.0)
    assert overflow_probability(m, q, b, steps) <= eta < overflow_probability(m, q, b - 1, steps)
    # Heterogeneous nodes: the largest requirement wins.
    b2 = buffer_size([m, 10_000], [q, 32 / 10_000], steps, DELTA, 8.0)
    assert b2 == max(b, buffer_size(10_000, 32 / 10_000, steps, DELTA, 8.0))
    assert buffer_size(m, q, steps, DELTA, 8.0, eta=0.0) == m + 1


def test_overflow_slack_is_accounted():
    z, q, steps = 1.1, 0.01, 10_000
    clean = epsilon(z, q, steps, DELTA)
    eta = 1e-9
    eps = epsilon(z, q, steps, DELTA, overflow_prob=eta)
    assert eps >= clean
    # The defining inequality: the ideal run at delta - (1 + e^eps) eta
    # already reaches eps.
    assert epsilon(z, q, steps, DELTA - (1 + math.exp(eps)) * eta) <= eps
    assert epsilon(z, q, steps, DELTA, overflow_prob=DELTA) == math.inf
    # With the recommended buffer the report moves by a hair.
    b = buffer_size(1000, q, steps, DELTA, clean)
    tiny = overflow_probability(1000, q, b, steps)
    assert example_epsilons(z, [q], steps, DELTA, overflow_probs=tiny)[0] == pytest.approx(clean, rel=1e-3)


# --------------------------------------------------------------------- validate


GOOD = dict(mode="example", mechanism="gaussian", clip_norm=1.0, noise_multiplier=1.0,
            target_epsilon=None, delta=1e-5, accountant="rdp", min_shard_size=1000)


@pytest.mark.parametrize("change,key", [
    (dict(mode="central"), "privacy.mode"),
    (dict(mechanism="exponential"), "privacy.mechanism"),
    (dict(mechanism="laplace"), "privacy.mechanism"),  # laplace needs update mode
    (dict(accountant="gdp"), "privacy.accountant"),
    (dict(delta=0.0), "privacy.delta"),
    (dict(delta=1.0), "privacy.delta"),
    (dict(delta="1e-5"), "privacy.delta"),
    (dict(clip_norm=0.0), "privacy.clip_norm"),
    (dict(clip_norm=-1.0), "privacy.clip_norm"),
    (dict(clip_norm=float("nan")), "privacy.clip_norm"),
    (dict(clip_norm=math.inf), "privacy.clip_norm"),  # with noise > 0
    (dict(noise_multiplier=-0.1), "privacy.noise_multiplier"),
    (dict(noise_multiplier=math.inf), "privacy.noise_multiplier"),
    (dict(noise_multiplier=None), "privacy.target_epsilon"),  # neither set
    (dict(target_epsilon=8.0), "privacy.target_epsilon"),  # both set
    (dict(noise_multiplier=None, target_epsilon=0.0), "privacy.target_epsilon"),
    (dict(noise_multiplier=None, target_epsilon=8.0, clip_norm=math.inf), "privacy.clip_norm"),
])
def test_validate_rejects_with_the_key_named(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate(**{**GOOD, **change})
    assert "\n" not in str(err.value)


def test_validate_accepts_and_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(**GOOD)
        validate(**{**GOOD, "noise_multiplier": None, "target_epsilon": 8.0})
        validate(**{**GOOD, "mode": "update", "mechanism": "laplace"})
        validate(**{**GOOD, "mode": "none", "mechanism": "bogus", "delta": 5.0})
    with pytest.warns(UserWarning, match="privacy.delta"):
        validate(**{**GOOD, "delta": 1e-3})  # >= 1/1000
    with pytest.warns(UserWarning, match="privacy.noise_multiplier"):
        validate(**{**GOOD, "noise_multiplier": 0.0, "clip_norm": math.inf})


def test_public_functions_reject_bad_arguments():
    with pytest.raises(ConfigError, match="privacy.delta"):
        epsilon(1.0, 0.01, 10, 0.0)
    with pytest.raises(ConfigError, match="privacy.accountant"):
        epsilon(1.0, 0.01, 10, DELTA, "moments")
    with pytest.raises(ConfigError, match="sample_rate"):
        epsilon(1.0, 1.5, 10, DELTA)
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        epsilon(-1.0, 0.01, 10, DELTA)
    with pytest.raises(ConfigError, match="privacy.mechanism"):
        update_epsilons(1.0, 10, DELTA, "exponential")
    # regressions: each of these returned a number (or crashed inside dp-accounting) instead of naming the argument
    for z in (1e-300, 1e300):  # ZeroDivisionError / OverflowError; the noise is drawn in float32
        with pytest.raises(ConfigError, match="privacy.noise_multiplier.*float32"):
            epsilon(z, 0.01, 10, DELTA)
    with pytest.raises(ConfigError, match="steps_done must be an integer"):  # 10.7 was accounted as 10 steps
        example_epsilons(1.0, [0.01, 0.02], 10.7, DELTA)
    with pytest.raises(ConfigError, match="steps must be an integer"):
        calibrate_example_noise(1.0, [0.01], 100.9, DELTA)
    with pytest.raises(ConfigError, match="sample_rates must be .* 1-D"):  # [2, 2] was read as 4 nodes
        example_epsilons(1.0, np.full((2, 2), 0.01), 10, DELTA)
    for mechanism in ("laplace", "gaussian"):  # Laplace skipped the check (delta enters its truncation charge)
        with pytest.raises(ConfigError, match="privacy.delta"):
            update_epsilons(1.0, 10, 2.0, mechanism)
        with pytest.raises(ConfigError, match="privacy.delta"):
            calibrate_update_noise(1.0, 10, math.nan, mechanism)
    with pytest.raises(ConfigError, match="rates must be"):  # nan
        overflow_probability(100, 1.5, 10, 100)
    with pytest.raises(ConfigError, match="steps must be"):  # a negative probability
        overflow_probability(100, 0.1, 5, -5)
    with pytest.raises(ConfigError, match="sizes must be"):
        overflow_probability(-3, 0.1, 5, 5)
    with pytest.raises(ConfigError, match="privacy.delta"):  # delta and epsilon swapped: 25
        buffer_size(100, 0.1, 100, 5.0, 1.0)
    with pytest.raises(ConfigError, match="fraction"):
        buffer_size(100, 0.1, 100, DELTA, 1.0, fraction=0.0)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_a_noise_too_small_for_any_epsilon_reports_inf(accountant):
    """Regression: with the PLD, z = 1e-4 crashed with dp-accounting's OverflowError, through a config too (at
    build). The truncation charge alone exceeds delta there, so the accountant need not be asked."""
    assert epsilon(1e-4, 0.01, 10, DELTA, accountant) == math.inf
    # Here the charge stays under delta and the accountant is asked: RDP's bound is huge, the PLD overflows (inf).
    assert epsilon(1e-4, 1e-7, 10, DELTA, accountant) > 1e6


def test_a_config_with_too_little_noise_builds_and_reports_inf():
    """Regression: ``privacy.noise_multiplier = 1e-5`` with the PLD crashed ``build`` (dp-accounting's
    OverflowError) instead of planning a run whose epsilon is inf."""
    from jaxdfl import experiment
    from jaxdfl.config import make_config

    cfg = make_config({"rounds": 2, "eval_every": 1, "topology": {"kind": "ring", "n": 4}, "model": {"name": "logreg"},
                       "privacy": {"mode": "example", "accountant": "pld", "noise_multiplier": 1e-5}})
    exp = experiment.build(cfg)
    assert exp.privacy.noise_multiplier == pytest.approx(1e-5)


def test_pld_coarsens_below_z_half_to_stay_fast_and_stays_a_pessimistic_bound():
    """At a fixed 1e-4 grid the PLD of a DP-SGD step took minutes at z = 0.1 and ran out of memory at z = 0.01
    (inside build, before anything compiled). Below z = 0.5 the grid now coarsens as 1/z^2."""
    import time

    assert accounting.pld_interval(0.5) == accounting.pld_interval(2.0) == 1e-4
    assert accounting.pld_interval(0.05) == pytest.approx(1e-2)
    z, q = 0.4, 0.13
    coarse = accounting._eps_ideal(z, q, 2, "pld")(1e-5)
    fine = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z, sampling_prob=q, value_discretization_interval=1e-4).self_compose(2)
    assert fine.get_epsilon_for_delta(1e-5) <= coarse <= fine.get_epsilon_for_delta(1e-5) * (1 + 1e-6)
    start = time.perf_counter()
    tiny = accounting._eps_ideal(0.01, q, 2, "pld")(1e-5)
    assert time.perf_counter() - start < 30 and math.isfinite(tiny)
    assert tiny <= accounting._eps_ideal(0.01, q, 2, "rdp")(1e-5)


def _reachable_normal_max():
    """The largest |draw| of rng.dp_normal, from its rarest words (all binade bits zero)."""
    import jax.numpy as jnp

    from jaxdfl import rng

    zero = jnp.zeros(1, jnp.uint32)
    return float(rng.normal_from_words(zero, zero, zero, zero)[0])


def test_truncation_charge_is_the_mass_the_neighbour_cannot_reach():
    """Regression (privacy audit): float32 noise ending at 9.16 sigma made update-mode runs calibrated to a large
    per-round epsilon fail their delta (1 round at target 40: delta >= P(N > 9.16 - 2/z) = 1.3e-4). The reach is now
    11.84 sigma and the mass beyond it, shifted by the sensitivity, is charged to delta: a calibrated run's own
    lower bound on delta stays within the target."""
    from jaxdfl import rng

    reach = _reachable_normal_max()
    assert reach == pytest.approx(stats.norm.isf(2.0**-106), rel=1e-6) and reach >= rng.DP_NORMAL_REACH
    for rounds, target in ((1, 40.0), (1, 64.0), (2, 64.0), (1, 30.0), (50, 8.0)):
        z = calibrate_update_noise(target, rounds, DELTA)
        assert update_epsilons(z, rounds, DELTA) <= target
        # the concrete failure: outputs below mu' - reach * sigma occur only without the example (one release)
        lower_bound = stats.norm.sf(reach - 2.0 / z)
        assert lower_bound <= accounting.truncation_delta(2.0 / z, 1) <= DELTA
    # the charge follows its definition, and is negligible at the usual noise levels
    t = 11.83
    assert accounting.truncation_delta(3.0, 7, 0.1) == pytest.approx(
        7 * 0.1 * (stats.norm.sf(t - 3.0) + 2.0**40 * stats.norm.sf(t - 1 / t)), rel=1e-9)
    assert accounting.truncation_delta(2.0, 7, mechanism="laplace") == pytest.approx(
        7 * 0.5 * (math.exp(-(72.7 - 2.0)) + 2.0**40 * math.exp(-72.7)), rel=1e-9)
    assert accounting.truncation_delta(1 / 0.5, 10_000, 0.01) < 1e-17
    # Laplace: pure epsilon while the charge stays within delta, else inf; calibration refuses what it cannot give
    assert update_epsilons(1.0, 10, DELTA, "laplace") == 20.0
    assert update_epsilons(2.0 / 65.0, 1, DELTA, "laplace") == math.inf
    with pytest.raises(ConfigError, match="target_epsilon"):
        calibrate_update_noise(64.0, 1, DELTA, "laplace")
