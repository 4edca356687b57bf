"""Byzantine-robust aggregation rules as one-node kernels, lifted over all nodes at once.

Contract. A rule aggregates ONE node's neighbourhood::

    rule(x [K, D], mask [K] bool, weights [K] float32, **hyper) -> [D]

Row 0 of ``x`` is the receiving node's own vector and is always valid; ``weights`` are the mixing weights ``W_ij``
(0 on padding). Padded rows may hold anything, inf and NaN included: they are removed by select, never by
multiplying with 0. Every rule accepts ``weights``; the server-style rules (median, trimmed mean, Krum, multi-Krum,
Bulyan, geometric median, centred clipping, MeaMed, MoNNA) ignore them and weigh the valid rows equally, as in
their papers; ``mean``, ``clipped_gossip`` and ``ios`` use them. The output keeps the input dtype (arithmetic in
float32, or wider for wider inputs). Non-finite valid rows (an attacker's inf or NaN) count as outliers: the
order statistics rank NaN as +inf, the distance rules rank a non-finite distance last, and the iterative rules
(geometric median, centred clipping, IOS) and clipped gossip leave such a row out, so every robust rule keeps its
output finite within its breakdown point. Squared distances are summed in the compute dtype: in float32, rows
more than about 1.8e19 apart overflow it and count as non-finite, and differences below about 1e-19 vanish, so
vectors at such scales need float64 inputs (``jax_enable_x64``, calling the rules directly: a simulation keeps its
models in float32 either way). A node with fewer valid rows than the rule (after its
pre-aggregators) needs gets its own vector back (:func:`enough_rows`).

:func:`aggregate` lifts a rule over the gathered ``[N, K, D]`` block with ``jax.vmap``, in chunks of nodes when
its temporaries would exceed a memory budget. Pre-aggregators (``PRE_REGISTRY``) transform the neighbourhood
first: ``pre(key, x, mask, weights, **hyper) -> (x, mask, weights)``. ``DEFAULTS`` lists every hyper-parameter
with its default; :func:`validate` checks a configuration on the host before compilation. ``reference`` holds
plain NumPy versions of every rule (the test oracles).

Hyper-parameters (``f`` always counts tolerated Byzantine rows in one neighbourhood of n valid rows, self
included):

- ``trimmed_mean``, ``meamed``, ``monna``, ``nnm``: ``f`` values/rows dropped; need n > 2f.
- ``krum``: ``f``; needs n - f - 2 >= 1 (its resilience needs 2f + 2 < n, not enforced). ``multi_krum``: ``f``
  and ``m`` (rows averaged; 0 = n - f).
- ``bulyan``: ``f``; needs n >= 4f + 3.
- ``geometric_median``: ``nu`` (smoothing radius > 0), ``iters`` (max Weiszfeld steps), ``tol`` (step length relative
  to the harmonic mean distance).
- ``centered_clip``: ``tau`` (radius >= 0), ``iters``.
- ``clipped_gossip``: ``tau`` (radius >= 0), ``adaptive`` (tau = distance of the (m - f)-th closest of the m
  neighbours), ``f`` (used when adaptive).
- ``ios``: ``f`` neighbours removed; needs f < number of neighbours.
- ``bucketing``: ``s`` (bucket size).
- ``clip``: ``tau`` (radius >= 0), ``self_centered`` (clip around the node's own vector instead of zero).

All of them except ``bucketing.s`` (it sets an output shape; see ``STATIC_HYPER``) may be traced jnp scalars: a
program of your own can sweep tau, nu, tol, f, m, iters or adaptive without recompiling. The engine passes them as
static values (one compiled program per setting): they are checked against the graph before compiling, and a
static ``f`` lets trimmed mean skip its sort.

BRIDGE (Yang & Bajwa 2019; Fang, Yang & Bajwa 2022) screens the node's own and its neighbours' vectors with a
robust rule and then takes the local gradient step (the engine's job). Its screening variants are rules here,
applied to the exchanged models with ``f = b``: BRIDGE-T = ``trimmed_mean``, BRIDGE-M = ``median``,
BRIDGE-K = ``krum``, BRIDGE-B = ``bulyan`` (Krum selection, then a median-centred trimmed mean).

Speed. Order statistics sort the K rows with a compare-exchange network fused into one elementwise loop over D (no
``jnp.sort``). Distance rules get all pairwise squared distances from one fused pass of squared differences (no
``[K, K, D]`` array, no cancellation-prone ``x @ x.T``) and iterate in the K-dimensional coefficient space.
benchmarks/aggregators.py measures them against per-node loops and the memory roofline.
"""

from jaxdfl.aggregators.distance import bulyan
from jaxdfl.aggregators.distance import centered_clip
from jaxdfl.aggregators.distance import clipped_gossip
from jaxdfl.aggregators.distance import geometric_median
from jaxdfl.aggregators.distance import ios
from jaxdfl.aggregators.distance import krum
from jaxdfl.aggregators.distance import mean
from jaxdfl.aggregators.distance import monna
from jaxdfl.aggregators.distance import multi_krum
from jaxdfl.aggregators.network import DEFAULTS
from jaxdfl.aggregators.network import MEMORY_BUDGET_BYTES
from jaxdfl.aggregators.network import PRE_REGISTRY
from jaxdfl.aggregators.network import REGISTRY
from jaxdfl.aggregators.network import STATIC_HYPER
from jaxdfl.aggregators.network import UNWEIGHTED_RULES
from jaxdfl.aggregators.network import aggregate
from jaxdfl.aggregators.network import auto_chunk
from jaxdfl.aggregators.network import check_contract
from jaxdfl.aggregators.network import enough_rows
from jaxdfl.aggregators.network import even_chunk
from jaxdfl.aggregators.network import temporaries
from jaxdfl.aggregators.network import min_rows
from jaxdfl.aggregators.network import over_chunks
from jaxdfl.aggregators.network import shipped
from jaxdfl.aggregators.network import validate
from jaxdfl.aggregators.order_stats import meamed
from jaxdfl.aggregators.order_stats import median
from jaxdfl.aggregators.order_stats import sorting_network
from jaxdfl.aggregators.order_stats import trimmed_mean
from jaxdfl.aggregators.pre import bucketing
from jaxdfl.aggregators.pre import clip
from jaxdfl.aggregators.pre import nnm

__all__ = [
    "DEFAULTS",
    "MEMORY_BUDGET_BYTES",
    "PRE_REGISTRY",
    "REGISTRY",
    "STATIC_HYPER",
    "UNWEIGHTED_RULES",
    "aggregate",
    "auto_chunk",
    "check_contract",
    "enough_rows",
    "even_chunk",
    "temporaries",
    "min_rows",
    "over_chunks",
    "shipped",
    "bucketing",
    "bulyan",
    "centered_clip",
    "clip",
    "clipped_gossip",
    "geometric_median",
    "ios",
    "krum",
    "mean",
    "meamed",
    "median",
    "monna",
    "multi_krum",
    "nnm",
    "sorting_network",
    "trimmed_mean",
    "validate",
]
