"""Registries, defaults, host-side validation, and the whole-network call :func:`aggregate`."""

from __future__ import annotations

import math
import operator

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from numbers import Integral
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np

from jaxdfl.aggregators import distance
from jaxdfl.aggregators import order_stats
from jaxdfl.aggregators import pre as pre_mod
from jaxdfl.aggregators._common import RANKS_MAX_K
from jaxdfl.aggregators._common import pair_buffer
from jaxdfl.aggregators._common import pair_loop
from jaxdfl.aggregators._common import row_buffer
from jaxdfl.errors import ConfigError
from jaxdfl.registry import Shipped, layout, shown, traced

REGISTRY: dict[str, Callable] = {
    "mean": distance.mean,
    "median": order_stats.median,
    "trimmed_mean": order_stats.trimmed_mean,
    "krum": distance.krum,
    "multi_krum": distance.multi_krum,
    "bulyan": distance.bulyan,
    "geometric_median": distance.geometric_median,
    "centered_clip": distance.centered_clip,
    "meamed": order_stats.meamed,
    "monna": distance.monna,
    "clipped_gossip": distance.clipped_gossip,
    "ios": distance.ios,
}

PRE_REGISTRY: dict[str, Callable] = {
    "nnm": pre_mod.nnm,
    "bucketing": pre_mod.bucketing,
    "clip": pre_mod.clip,
}

DEFAULTS: dict[str, dict[str, object]] = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"f": 1},
    "krum": {"f": 1},
    "multi_krum": {"f": 1, "m": 0},
    "bulyan": {"f": 1},
    "geometric_median": {"nu": 0.1, "iters": 100, "tol": 1e-6},
    "centered_clip": {"tau": 1.0, "iters": 3},
    "meamed": {"f": 1},
    "monna": {"f": 1},
    "clipped_gossip": {"tau": 1.0, "adaptive": False, "f": 1},
    "ios": {"f": 1},
    "nnm": {"f": 1},
    "bucketing": {"s": 2},
    "clip": {"tau": 1.0, "self_centered": False},
}

#: Whether a rule or pre-aggregator name is registered to jaxdfl's own function: its built-in checks
#: (hyper-parameter ranges, the rows its f needs) hold only then, not for a user's function under that name.
shipped = Shipped(REGISTRY, PRE_REGISTRY)


#: Built-in rules that ignore the mixing weights (server-style, unweighted). Every other rule, a user's included, is
#: taken to read them (``mean`` is gossip, ``clipped_gossip`` and ``ios`` weigh by ``W_ij``).
UNWEIGHTED_RULES = frozenset({"median", "trimmed_mean", "meamed", "krum", "multi_krum", "bulyan", "geometric_median",
                              "centered_clip", "monna"})

# Hyper-parameters that fix array shapes and must be Python values (all others may be traced jnp scalars).
STATIC_HYPER: dict[str, tuple[str, ...]] = {"bucketing": ("s",)}

# Working-set budget of one aggregate() call beyond the input block; above it nodes are processed in chunks.
MEMORY_BUDGET_BYTES = 1 << 30


def _merged(name: str, hyper: Mapping | None, registry: Mapping, where: str) -> dict:
    if name not in registry:
        raise ConfigError(f"{where}: unknown name {name!r}; allowed: {', '.join(registry)}")
    hyper = dict(hyper or {})
    defaults = DEFAULTS.get(name, {})  # a rule without hyper-parameters needs no DEFAULTS entry
    unknown = sorted(set(hyper) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ConfigError(f"{where}.{unknown[0]}: unknown hyper-parameter for {name!r}; allowed: {allowed}")
    return {**defaults, **hyper}


def _named_pre(pre: Sequence | Mapping) -> list[tuple[str, dict]]:
    """Pre-aggregators given as names or ``(name, hyper)`` pairs (or a mapping name -> hyper, in order) ->
    ``(name, hyper with defaults)`` pairs."""
    if isinstance(pre, str):
        raise ConfigError(f"aggregation.pre must be a list of pre-aggregator names, e.g. [{pre!r}], got {pre!r}")
    out = []
    for item in pre.items() if isinstance(pre, Mapping) else pre:
        if isinstance(item, str):
            name, ph = item, None
        elif isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str):
            name, ph = item
        else:
            raise ConfigError(f"aggregation.pre: each entry must be a name or a (name, hyper-parameters) pair, "
                              f"got {item!r}")
        if name not in PRE_REGISTRY:
            raise ConfigError(f"aggregation.pre: unknown pre-aggregator {name!r}; allowed: {', '.join(PRE_REGISTRY)}")
        out.append((name, _merged(name, ph, PRE_REGISTRY, f"aggregation.{name}")))
    return out


#: Rules and pre-aggregators that sum over all row pairs (``_common._pair_sums``), with a buffer of partial sums
#: (``_common.pair_buffer``).
PAIRWISE = frozenset({"krum", "multi_krum", "bulyan", "geometric_median", "centered_clip", "ios", "nnm"})

#: Pre-aggregators whose output rows are weighted sums of their input rows (``pre._mix``).
MIXING = frozenset({"nnm", "bucketing"})

#: Rules and pre-aggregators that read their input once, coordinate by coordinate, in one loop over D: XLA fuses an
#: unrolled mix (up to ``RANKS_MAX_K`` rows) into them, so its output is never stored.
ONE_READ = frozenset({"mean", "median", "trimmed_mean", "meamed", "bucketing"})


def _output_rows(name: str, hyper: Mapping, k: int) -> int:
    """Rows of a pre-aggregator's output for ``k`` input rows: ``1 + ceil((K - 1) / s)`` for bucketing, else K."""
    return 1 + -(-(k - 1) // int(hyper["s"])) if name == "bucketing" else k


def temporaries(rule: str, pre: Sequence | Mapping, k: int, d: int) -> float:
    """A node's working set beyond its input for ``pre`` then ``rule``, in ``[K, D]`` neighbourhoods (an upper
    bound on XLA's CPU memory analysis, which the automatic chunking plans with).

    ``pre`` is given as to :func:`aggregate` (names or ``(name, hyper)`` pairs). The estimate adds:

    - each pre-aggregator's stored output (``K' / K`` for K' output rows), times the copies XLA keeps of it. An
      unrolled mix (NNM or bucketing on up to ``RANKS_MAX_K`` rows) is fused into a consumer in ``ONE_READ`` (0
      copies: 0.00-0.01 for NNM or bucketing then the median at K = 9 and 17); other consumers keep 2 (MoNNA,
      clipped gossip or norm clipping after NNM: 2.0; Krum 1.9), pairwise ones whose pair sums loop over blocks 3
      (NNM then multi-Krum, the geometric median, centred clipping or IOS at D = 20,000: 3.0; Krum 2.0). A mix in
      a loop (more rows) and norm clipping keep 1.
    - the largest of a fused loop's buffer (``_common.row_buffer``, 1 / T), the pair-sum buffers of the pairwise
      steps (``_common.pair_buffer``; summed: NNM then Krum at K = 65 keeps 1.5) and a layered network's 2
      (:func:`order_stats.runs_by_layer`; XLA reports 2.0 for the median at K = 257).

    In one pass the pair-sum buffer is ``(K - 1) / (2 T)`` (T = 20 from D = 320): at K = 129, D = 1,000 Krum's
    estimate is 3.2 neighbourhoods per node, 213 MB for 129 nodes, where XLA reports 220 MB. Figures are XLA's CPU
    memory analysis at D = 1,000-20,000 (jax 0.10).
    """
    named = _named_pre(pre)
    rows, stored, pair = k, 0.0, 0.0
    for (name, h), consumer in zip(named, [name for name, _ in named[1:]] + [rule]):
        if name in PAIRWISE:
            pair += pair_buffer(rows, d) * rows / k
        out = _output_rows(name, h, rows)
        if name in MIXING and rows <= RANKS_MAX_K:
            copies = 0 if consumer in ONE_READ else 3 if consumer in PAIRWISE and pair_loop(out, d) else 2
        else:
            copies = 1
        rows = out
        stored += copies * rows / k
    if rule in PAIRWISE:
        pair += pair_buffer(rows, d) * rows / k
    layered = 2.0 * rows / k if order_stats.runs_by_layer(rule, rows) else 0.0
    return stored + max(row_buffer(d), pair, layered)


def auto_chunk(n: int, k: int, d: int, itemsize: int = 4, budget: int = MEMORY_BUDGET_BYTES,
               temporaries: float = 0.5) -> int | None:
    """Nodes per chunk so that the rule's temporaries stay under ``budget`` bytes; None when all nodes fit at once.

    A node's temporaries are estimated as ``temporaries * K * D * itemsize`` bytes (``aggregate`` passes
    :func:`temporaries` of its rule and pre-aggregators). A chunked node also costs its rows once, for the chunk's
    copy (:func:`over_chunks`), so chunking is chosen only when the temporaries alone exceed the budget. The chunk
    is the largest that fits, evened out (:func:`even_chunk`).
    """
    rows = k * d * itemsize
    if n * temporaries * rows <= budget:
        return None
    return even_chunk(n, max(1, int(budget // ((temporaries + 1) * rows))))


def even_chunk(n: int, c_max: int) -> int:
    """``ceil(N / ceil(N / c_max))``: chunks of at most ``c_max`` rows, as equal as they can be, so that the last
    chunk of :func:`over_chunks` overlaps the one before by fewer rows than there are chunks (N = 300 with
    ``c_max`` = 145 gives 3 chunks of 100, not 145 + 145 + a last chunk that recomputes 135 rows)."""
    return -(-n // -(-n // c_max))


def aggregate(key: jax.Array, block: jax.Array, mask: jax.Array, weights: jax.Array, rule: str,
              hyper: Mapping | None = None, pre: Sequence = (), chunk_size: int | None = None,
              memory_budget: int = MEMORY_BUDGET_BYTES) -> jax.Array:
    """Every node's aggregate of its own neighbourhood, the one-node rule lifted over nodes.

    Definition: ``out_i = rule(pre_p(... pre_1(x_i)))`` for each node i, with ``x_i = block[i]`` (row 0 = node i's
    own vector). The rule is lifted with ``jax.vmap``. Nodes are processed in chunks of ``chunk_size`` when given,
    or automatically when the temporaries would exceed ``memory_budget`` bytes (see :func:`auto_chunk`; default
    1 GiB). The chunks run one after another in a loop (:func:`over_chunks`), each on a ``[c, K, D]`` copy of its
    rows, so one chunk's copy and temporaries are alive at a time. Works under ``jit`` with ``rule``, ``pre``,
    ``chunk_size`` static; numeric hyper-parameters in ``hyper`` may be traced (except those in ``STATIC_HYPER``).

    Args:
        key: PRNG key; one subkey per node and per pre-aggregator is split from it (only pre-aggregators use them).
        block: [N, K, D] gathered neighbourhoods, row 0 of node i its own vector.
        mask: [N, K] bool valid rows (row 0 always True).
        weights: [N, K] mixing weights (0 on padding; per node summing to 1 over valid rows), or None: uniform over
            the valid rows.
        rule: a name in ``REGISTRY``.
        hyper: the rule's hyper-parameters (missing ones take ``DEFAULTS[rule]``).
        pre: sequence of pre-aggregator names or ``(name, hyper_dict)`` pairs (or a mapping name -> hyper_dict)
            applied in order before the rule.
        chunk_size: nodes per chunk (None: automatic; 0 or >= N: all at once).
        memory_budget: bytes allowed for temporaries when choosing the chunk automatically.

    A node with fewer valid rows than its pre-aggregators and rule need (:func:`enough_rows`; crashed senders,
    dropped links) gets its own vector ``block[i, 0]`` back instead of a rule applied out of its domain.

    Returns:
        [N, D] in the dtype of ``block``.
    """
    h = _merged(rule, hyper, REGISTRY, "aggregation.rule" if rule not in REGISTRY else "aggregation")
    named = _named_pre(pre)
    _check_call(block, mask, weights, chunk_size, memory_budget)
    rows = block.shape[1]
    for name, ph, where in [(name, ph, f"aggregation.{name}") for name, ph in named] + [(rule, h, "aggregation")]:
        # Python values only: arrays (traced ones among them) are the caller's to keep in range
        python = {key: v for key, v in ph.items() if not isinstance(v, jax.Array | np.ndarray)}
        _check_hyper(name, python, where)
        # an f that not even K rows tolerate leaves every node its own vector: a configuration error
        _check_sizes(name, python, rows, where, "the block's neighbourhoods have at most")
        if name == "bucketing":
            rows = bucketed(rows, ph["s"])
    if weights is None:
        weights = mask / jnp.sum(mask, axis=1, keepdims=True)
    steps = [(PRE_REGISTRY[name], ph) for name, ph in named]
    rule_fn = REGISTRY[rule]
    n, k, d = block.shape
    always = all(isinstance(r, int) and r <= 1 for r in [min_rows(rule, h)] + [min_rows(*item) for item in named])

    def one(node_key, x, m, w):
        own, ok = x[0], enough_rows(jnp.sum(m.astype(jnp.int32)), rule, h, named)
        subkeys = jax.random.split(node_key, len(steps)) if steps else []
        for (fn, ph), sk in zip(steps, subkeys):
            x, m, w = fn(sk, x, m, w, **ph)
        out = rule_fn(x, m, w, **h)
        return out if always else jnp.where(ok, out, own)

    keys = jax.random.split(key, n)
    if chunk_size is None:
        chunk_size = auto_chunk(n, k, d, block.dtype.itemsize, memory_budget,
                                temporaries(rule, named, k, d))
    lifted = jax.vmap(one)
    if not chunk_size or chunk_size >= n:
        return lifted(keys, block, mask, weights)
    c = int(chunk_size)

    def chunk(_, start):
        # The chunk's rows are copied as the output of a conditional (a fusion boundary): fused into the rule, the
        # dynamic slice slowed it (chunks of 50 at N = 100, K = 9, D = 1e5: the median 118 ms, 78 with the copy).
        rows = jax.lax.cond(start >= 0, lambda: jax.lax.dynamic_slice_in_dim(block, start, c),
                            lambda: jnp.zeros((c, k, d), block.dtype))
        node_keys, m, w = (jax.lax.dynamic_slice_in_dim(a, start, c) for a in (keys, mask, weights))
        return (lifted(node_keys, rows, m, w),)

    return over_chunks(n, c, chunk, (jnp.zeros((n, d), block.dtype),))[0]


def over_chunks(n: int, c: int, fn: Callable, out: tuple) -> tuple:
    """``fn`` over chunks of ``c`` of ``n`` rows in one ``fori_loop``: chunk j covers rows ``s_j .. s_j + c - 1``, with
    ``s_j = min(j c, N - c)``, and ``fn(j, s_j)`` returns their ``[c, ...]`` results, written in place into the
    ``[N, ...]`` arrays of ``out`` (returned).

    When c does not divide N the last chunk overlaps the one before (those rows are recomputed and overwritten)
    instead of padding N, which would need one more ``[N, ...]`` buffer. One chunk's inputs and temporaries are alive
    at a time: a slice of the input that ``fn`` takes is one ``[c, ...]`` copy, reused by every chunk.
    """
    def step(j, acc):
        start = jnp.minimum(j * c, n - c)
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, b, start, axis=0) for a, b in zip(acc, fn(j, start)))

    return jax.lax.fori_loop(0, -(-n // c), step, tuple(out))


def _check_call(block, mask, weights, chunk_size, memory_budget) -> None:
    """The shapes :func:`aggregate` needs (static, so checked under jit too), each error naming its argument."""
    if block.ndim != 3:
        raise ConfigError(f"aggregate: block must be [N, K, D], got shape {block.shape}")
    if mask.shape != block.shape[:2] or mask.dtype != jnp.bool_:
        raise ConfigError(f"aggregate: mask must be bool [N, K] = {block.shape[:2]}, got {mask.dtype} {mask.shape}")
    if weights is not None and weights.shape != mask.shape:
        raise ConfigError(f"aggregate: weights must be [N, K] = {mask.shape} (or None: uniform), got {weights.shape}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not _is_index(chunk_size) or chunk_size < 0):
        raise ConfigError(f"aggregate: chunk_size must be None or an integer >= 0, got {chunk_size!r}")
    if isinstance(memory_budget, bool) or not _is_index(memory_budget) or memory_budget < 1:
        raise ConfigError(f"aggregate: memory_budget must be a positive integer number of bytes, got {memory_budget!r}")


def _is_index(value) -> bool:
    """Whether ``value`` is a concrete integer (a Python or NumPy int, or a 0-d integer array)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_number(where: str, value, *, integer=False, minimum=None, strict=False) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{where} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def _check_hyper(name: str, h: Mapping, where: str) -> None:
    if not shipped(name):  # a user's rule: config checks its values' types against its DEFAULTS, ranges are its own
        return
    for key, value in h.items():
        at = f"{where}.{key}"
        if key in ("f", "m"):
            _check_number(at, value, integer=True, minimum=0)
        elif key in ("iters", "s"):
            _check_number(at, value, integer=True, minimum=1)
        elif key == "nu":
            _check_number(at, value, minimum=0, strict=True)
        elif key in ("tau", "tol"):
            _check_number(at, value, minimum=0)
        elif key in ("adaptive", "self_centered"):
            if not isinstance(value, bool | np.bool_):
                raise ConfigError(f"{at} must be true or false, got {value!r}")


def min_rows(name: str, hyper: Mapping | None = None) -> int:
    """Fewest valid rows (self included) a neighbourhood needs for ``name`` with these hyper-parameters.

    The engine keeps a node's own message when a round leaves it fewer (crashed or dropped neighbours).
    """
    if not shipped(name):
        return 1
    h = {**DEFAULTS.get(name, {}), **(hyper or {})}
    f = h.get("f", 0)  # a Python int, or a traced scalar inside a program
    if name in ("trimmed_mean", "meamed", "monna", "nnm"):
        return 2 * f + 1
    if name == "krum":
        return f + 3
    if name == "multi_krum":  # and at least m rows to average (m = 0: n - f)
        m = h.get("m", 0)
        return max(f + 3, m) if isinstance(f, int) and isinstance(m, int) else jnp.maximum(f + 3, m)
    if name == "bulyan":
        return 4 * f + 3
    if name == "ios":
        return f + 2
    if name == "clipped_gossip":
        adaptive = h["adaptive"]
        return (f + 2 if adaptive else 1) if isinstance(adaptive, bool | np.bool_) else jnp.where(adaptive, f + 2, 1)
    return 1


def enough_rows(counts, rule: str, hyper: Mapping | None = None, pre: Sequence = ()):
    """Whether neighbourhoods of ``counts`` valid rows (self included) are in the domain of ``pre`` then ``rule``.

    Each pre-aggregator and the rule need :func:`min_rows` rows of their input; bucketing turns n rows into
    ``1 + ceil((n - 1) / s)`` (as :func:`validate` counts). :func:`aggregate` returns a node's own vector where
    this is False.

    Args:
        counts: int or [N] ints (NumPy or traced).
        rule: a name in ``REGISTRY``; hyper: its hyper-parameters (missing ones take the defaults).
        pre: sequence of ``(name, hyper_dict)`` pre-aggregators, applied in order.

    Returns:
        bool, the shape of ``counts``.
    """
    ok = counts >= 1
    for name, ph in _named_pre(pre):
        ok = ok & (counts >= min_rows(name, ph))
        if name == "bucketing":
            counts = bucketed(counts, ph["s"])
    return ok & (counts >= min_rows(rule, hyper))


def bucketed(counts, s):
    """Rows left by bucketing ``counts`` rows (self + n - 1 neighbours) in buckets of ``s``: ``1 + ceil((n-1)/s)``."""
    return 1 + (counts - 1 + s - 1) // s


#: The condition behind :func:`min_rows` for the rules whose f it bounds, for error messages.
_NEEDS = {"trimmed_mean": "2f < n", "meamed": "2f < n", "monna": "2f < n", "nnm": "2f < n",
          "krum": "n - f - 2 >= 1", "multi_krum": "n - f - 2 >= 1", "bulyan": "n >= 4f + 3",
          "ios": "f < number of neighbours", "clipped_gossip": "f < number of neighbours in adaptive mode"}


def _check_sizes(name: str, h: Mapping, n_min: int, where: str, scope: str = "the smallest neighbourhood has") -> None:
    """Raise if f (or m) is too large for the smallest neighbourhood n_min (valid rows incl. self)."""
    f = h.get("f", 0)

    def rows(g):  # the rows f = g needs (multi-Krum's m is checked on its own below)
        return min_rows(name, {**h, "f": g, "m": 0})

    if name in _NEEDS and rows(f) > n_min:
        bound = max((g for g in range(f) if rows(g) <= n_min), default=-1)  # the largest f that fits
        if bound < 0:  # not even f = 0 fits
            raise ConfigError(f"{where}.f={f}: {name!r} needs {_NEEDS[name]}, which no f meets: {scope} n={n_min} "
                              "rows (self included); use another rule or a graph with larger degrees")
        raise ConfigError(f"{where}.f={f} is too large for {name!r}: {scope} n={n_min} rows (self included) and "
                          f"{name} needs {_NEEDS[name]}, i.e. f <= {bound}")
    if name == "multi_krum" and shipped(name) and h.get("m", 0) > n_min:
        raise ConfigError(f"{where}.m={h['m']} is too large: {scope} n={n_min} rows; allowed: 0 (= n - f) to "
                          f"{n_min}")


def validate(rule: str, hyper: Mapping | None, sizes, pre: Sequence = ()) -> None:
    """Host-side check of a rule, its hyper-parameters and pre-aggregators against the neighbourhood sizes.

    Raises :class:`jaxdfl.errors.ConfigError` (one line naming the setting, e.g. ``aggregation.f``) for unknown rule
    or pre-aggregator names, unknown or ill-typed hyper-parameters, negative radii, and an ``f`` (or ``m``) too large
    for the smallest neighbourhood. Sizes are propagated through the pre-aggregators (bucketing shrinks them).

    Args:
        rule: a name in ``REGISTRY``.
        hyper: the rule's hyper-parameters (missing ones take the defaults).
        sizes: [N] ints, number of valid rows per node, self included.
        pre: sequence of ``(name, hyper_dict)``.
    """
    if rule not in REGISTRY:
        raise ConfigError(f"aggregation.rule: unknown rule {rule!r}; allowed: {', '.join(REGISTRY)}")
    sizes = np.asarray(sizes)
    if sizes.ndim != 1 or sizes.size == 0 or sizes.min() < 1:
        raise ConfigError("aggregation: every node needs at least one valid row (itself)")
    for name, ph in _named_pre(pre):
        _check_hyper(name, ph, f"aggregation.{name}")
        _check_sizes(name, ph, int(sizes.min()), f"aggregation.{name}")
        if name == "bucketing":
            sizes = bucketed(sizes, ph["s"])
    h = _merged(rule, hyper, REGISTRY, "aggregation")
    _check_hyper(rule, h, "aggregation")
    _check_sizes(rule, h, int(sizes.min()), "aggregation")


def check_contract(rule: str, hyper: Mapping | None, k: int, d: int, pre: Sequence = (), dtype=jnp.float32) -> None:
    """Trace the one-node pipeline, ``pre`` then ``rule``, on one node's shapes (on the host, nothing is compiled) and
    raise if a step does not follow its contract: a pre-aggregator maps ``(key, x [K, D], mask [K], weights [K],
    **hyper)`` to ``(x [K', D], mask [K'] bool, weights [K'])``, the rule ``(x [K, D], mask [K], weights [K],
    **hyper)`` to ``[D]``, each in the dtype of ``x``.

    Raises:
        ConfigError: one line naming the setting (``aggregation.pre`` or ``aggregation.rule``), the contract and
        what the function did instead.
    """
    x, m, w = (jax.ShapeDtypeStruct((k, d), dtype), jax.ShapeDtypeStruct((k,), jnp.bool_),
               jax.ShapeDtypeStruct((k,), jnp.float32))
    key = jax.random.key(0)
    for name, ph in _named_pre(pre):
        fn = PRE_REGISTRY[name]
        contract = (f"aggregation.pre={name!r}: a pre-aggregator is called as pre(key, x [K, D], mask [K], "
                    "weights [K], **hyper) -> (x [K', D], mask [K'], weights [K'])")
        out = traced(contract, f"K={x.shape[0]}, D={d}", lambda *a, fn=fn, ph=ph: fn(*a, **ph), key, x, m, w)
        got = layout(out)
        rows = got[0][0][0] if got is not None and len(got) == 3 and got[0][0] else None
        want = (((rows, d), jnp.dtype(dtype)), ((rows,), jnp.dtype(jnp.bool_)), ((rows,), jnp.dtype(jnp.float32)))
        if rows is None or got != want:
            raise ConfigError(f"{contract}; with K={x.shape[0]}, D={d} it returned ({shown(out)})")
        x, m, w = out
    fn, h = REGISTRY[rule], _merged(rule, hyper, REGISTRY, "aggregation")
    contract = f"aggregation.rule={rule!r}: a rule is called as rule(x [K, D], mask [K], weights [K], **hyper) -> [D]"
    out = traced(contract, f"K={x.shape[0]}, D={d}", lambda *a: fn(*a, **h), x, m, w)
    if getattr(out, "shape", None) != (d,) or getattr(out, "dtype", None) != jnp.dtype(dtype):
        got = f"{out.dtype}{list(out.shape)}" if hasattr(out, "shape") else type(out).__name__
        raise ConfigError(f"{contract} in the dtype of x; with K={x.shape[0]}, D={d} it returned {got}, not "
                          f"{jnp.dtype(dtype)}[{d}]")

