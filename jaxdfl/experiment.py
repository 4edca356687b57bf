"""Running an experiment from a config (host side): build everything, compile once, run, account, report.

``build(cfg)`` turns a validated :class:`~jaxdfl.config.Config` into an :class:`Experiment` (topology, data shards,
model, Byzantine mask, the static :class:`~jaxdfl.simulation.Spec`, device arrays and dynamic hyper-parameters);
every setting is checked here, before anything is compiled. ``run(cfg)`` compiles the one program, runs it (all
seeds at once when ``seeds`` is set), computes the privacy spent on the host and returns a :class:`Result`.
"""

from __future__ import annotations

import functools
import os
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdfl import aggregators, attacks, byzantine, checkpoint, gossip, models, simulation, topology
from jaxdfl import data as data_mod
from jaxdfl.config import (Config, InertSettingWarning, graph_changes, inert_settings, load_config, make_config,
                           plain_gossip, with_defaults)
from jaxdfl.errors import ConfigError
from jaxdfl.privacy import accounting
from jaxdfl.training import LocalSpec

METRICS = ("accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean", "consensus_distance", "epsilon")


@dataclass
class Experiment:
    """Everything a run needs, built and validated on the host."""

    config: Config
    topology: topology.Topology
    dataset: data_mod.Dataset
    shards: data_mod.Shards
    model: models.FlatModel
    byzantine: np.ndarray  # [N] bool
    spec: simulation.Spec
    arrays: simulation.Arrays
    hyper: dict[str, Any]
    sample_rates: np.ndarray  # [N] q_i = batch_size / m_i
    privacy: PrivacyPlan
    devices: int = 1
    seed_mode: str = "vmap"  # how a multi-seed run lays out its seeds: "vmap" (batched) or "map" (one after another)

    @property
    def noise_multiplier(self) -> float | None:
        return self.privacy.noise_multiplier

    @property
    def seeds(self) -> list[int] | None:
        s = self.config.seeds
        if s is None:
            return None
        return list(range(self.config.seed, self.config.seed + s)) if isinstance(s, int) else list(s)

    def epsilons(self, rounds_done: int) -> np.ndarray:
        """Per-node epsilon spent after ``rounds_done`` rounds (NaN for non-private runs)."""
        p = self.config.privacy
        if p.mode == "none":
            return np.full(self.topology.n, np.nan)
        if rounds_done == 0:
            return np.zeros(self.topology.n)
        if p.mode == "example":
            steps = rounds_done * self.config.train.local_steps
            return accounting.example_epsilons(self.noise_multiplier, self.sample_rates, steps, p.delta,
                                               p.accountant, self.privacy.overflow)
        eps = accounting.update_epsilons(self.noise_multiplier, rounds_done, p.delta, p.mechanism, p.accountant)
        return np.full(self.topology.n, eps)

    def epsilon(self, rounds_done: int) -> float:
        """The largest epsilon over honest nodes after ``rounds_done`` rounds (what ``history["epsilon"]`` reports;
        NaN for non-private runs), from the nodes that can hold it only (see ``accounting.example_epsilon_max``)."""
        p = self.config.privacy
        if p.mode != "example" or rounds_done == 0:
            return float(self.epsilons(rounds_done)[~self.byzantine].max())
        honest = ~self.byzantine
        return accounting.example_epsilon_max(self.noise_multiplier, self.sample_rates[honest],
                                              rounds_done * self.config.train.local_steps, p.delta, p.accountant,
                                              self.privacy.overflow[honest])


@dataclass
class Result:
    """What a run returns: ``history`` (metric -> ``[E]`` or ``[S, E]`` array) and ``summary`` (summary.json)."""

    config: Config
    history: dict[str, np.ndarray]
    summary: dict[str, Any]
    state: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy settings a run uses, fixed on the host before compiling."""

    noise_multiplier: float | None  # z (given, or calibrated to the target)
    buffer: int = 0  # static Poisson buffer of DP-SGD
    overflow: np.ndarray | None = None  # [N] probability each node's buffer ever overflows (charged to delta)


#: DP-SGD's Poisson buffer is a multiple of this many rows (see :func:`plan_privacy`).
BUFFER_STEP = 8


def _float32_up(z: float) -> float:
    """The float32 noise multiplier the program uses for z: rounded up, plus one ulp for the rounding of the noise
    std ``z * C`` in float32, so the noise is never below what epsilon is accounted for."""
    f = np.float32(z)
    if f < z:
        f = np.nextafter(f, np.float32(np.inf))
    return float(np.nextafter(f, np.float32(np.inf))) if z > 0 else float(z)


def plan_privacy(cfg: Config, shards: data_mod.Shards, rates: np.ndarray, honest: np.ndarray) -> PrivacyPlan:
    """Validate the privacy settings, size the DP-SGD buffer, and calibrate z to a target epsilon if asked.

    ``example`` mode: steps = rounds x local_steps Poisson-subsampled Gaussian steps per node with q_i = b/m_i;
    the static buffer B is chosen so that the chance a node's batch ever overflows it (eta_i) is a 1e-3 share of
    delta, and eta_i is charged to delta in the accounting. ``update`` mode: one Gaussian (or Laplace)
    release per round, node-level adjacency (see :mod:`jaxdfl.privacy.accounting`). z is the float32 value the
    program runs with (:func:`_float32_up`), and epsilon is accounted for that value.
    """
    p = cfg.privacy
    accounting.validate(p.mode, p.mechanism, p.clip_norm, p.noise_multiplier, p.target_epsilon, p.delta,
                        p.accountant, int(shards.sizes.min()))
    if p.mode == "none":
        return PrivacyPlan(None)
    if p.mode == "update":
        z = p.noise_multiplier
        if z is None:
            z = accounting.calibrate_update_noise(p.target_epsilon, cfg.rounds, p.delta, p.mechanism, p.accountant)
        return PrivacyPlan(_float32_up(z))
    steps = cfg.rounds * cfg.train.local_steps
    if p.target_epsilon is not None:
        eps_end = p.target_epsilon
    else:
        # at the z the program runs with, whose accountant calls the run's epsilons then reuse
        eps_end = accounting.example_epsilon_max(_float32_up(p.noise_multiplier), rates[honest], steps, p.delta,
                                                 p.accountant)
    buffer = accounting.buffer_size(shards.sizes, rates, steps, p.delta, eps_end)
    # Rounded up to a multiple of BUFFER_STEP (never past the largest shard + 1, where overflow is impossible): a
    # larger buffer only lowers the overflow charged to delta, and nearby noise levels then share one program.
    buffer = min(-(-buffer // BUFFER_STEP) * BUFFER_STEP, int(shards.sizes.max()) + 1)
    overflow = np.asarray(accounting.overflow_probability(shards.sizes, rates, buffer, steps), np.float64)
    z = p.noise_multiplier
    if z is None:
        z = accounting.calibrate_example_noise(p.target_epsilon, rates[honest], steps, p.delta, p.accountant,
                                               overflow[honest])
    return PrivacyPlan(_float32_up(z), int(buffer), overflow)


def _as_config(cfg: Config | dict | str) -> Config:
    if isinstance(cfg, (str, os.PathLike)):
        return load_config(cfg)
    if not isinstance(cfg, Mapping):  # Config is a Mapping
        raise ConfigError(f"a run takes a Config, a config dict or a TOML path, got {type(cfg).__name__} {cfg!r}")
    return cfg if isinstance(cfg, Config) else make_config(cfg)


def _check_exchange(cfg: Config, pool: list[topology.Topology], byz: np.ndarray, rule_hyper: dict, pre: tuple):
    """Host-side checks of the robust exchange that need the graphs and the Byzantine placement."""
    t, att, agg = cfg.topology, cfg.attack, cfg.aggregation
    if att.name == "mimic" and att.get("target") is not None and (att.target >= t.n or byz[att.target]):
        raise ConfigError(f"attack.target={att.target}: mimic copies an honest node; allowed: the honest ids "
                          f"below {t.n} (Byzantine: {np.flatnonzero(byz).tolist()})")
    if "clip" in agg.pre and not agg.clip.self_centered and cfg.train.share == "model":
        raise ConfigError("aggregation.clip.self_centered = false clips whole models to norm tau (train.share = "
                          "\"model\"); set self_centered = true, or train.share = \"update\"")
    # every graph a round can draw (links lost to dropout fall back at run time: the kept_own_share metric)
    sizes = np.full(t.n, 2) if t.dynamic == "matching" else np.concatenate([g.sizes for g in pool])
    try:
        aggregators.validate(agg.rule, rule_hyper, sizes, pre)
    except ConfigError as err:
        if t.dynamic != "matching":
            raise
        raise ConfigError(f"{err} (topology.dynamic = \"matching\" gives each node one partner a round)") from None


def build(cfg: Config | dict | str) -> Experiment:
    """Build and validate an experiment from a config (a Config, a dict tree or a TOML path)."""
    cfg = _as_config(cfg)
    t, d, tr = cfg.topology, cfg.data, cfg.train
    topo_params = _listify(topology.family_params(t.kind, t))
    topo = topology.make(t.kind, t.n, seed=t.seed, weights=_listify(t.weights), **topo_params)
    pool = [topo]  # resample: the configured graph and pool - 1 more of its family
    if t.dynamic == "resample":
        pool += [topology.make(t.kind, t.n, seed=t.seed + i, weights=t.weights, **topo_params)
                 for i in range(1, t.pool)]
    ds = data_mod.load(d, t.n)
    att = cfg.attack
    byz = byzantine.place(t.n, att.byzantine, att.placement, seed=att.seed, degrees=topo.degrees,
                          ids=list(att.ids))
    shards = data_mod.partition(ds, t.n, d.partition, seed=d.seed, alpha=d.alpha,
                                shards_per_node=d.shards_per_node, min_size=1, quantity_skew=d.quantity_skew,
                                quantity_alpha=d.quantity_alpha)
    if cfg.privacy.mode == "example" and tr.batch_size > shards.sizes.min():
        raise ConfigError(f"train.batch_size={tr.batch_size} exceeds the smallest shard ({shards.sizes.min()} "
                          f"examples); DP-SGD needs batch_size <= every node's shard size")
    y = shards.y
    if att.name in attacks.POISONING:
        y = np.where(byz[:, None], attacks.flip_labels(y, ds.num_classes), y)

    agg = cfg.aggregation
    rule_hyper = {k: agg[k] for k in aggregators.DEFAULTS.get(agg.rule, {})}
    pre = tuple((name, dict(agg[name])) for name in agg.pre)
    _check_exchange(cfg, pool, byz, rule_hyper, pre)

    honest = ~byz
    rates = tr.batch_size / shards.sizes.astype(np.float64)
    plan = plan_privacy(cfg, shards, rates, honest)
    z = plan.noise_multiplier
    p = cfg.privacy

    plain = plain_gossip(cfg)
    static_graph = not graph_changes(t)
    path = gossip.choose_path(t.n, topo.neighbors.shape[1], agg.gossip) if plain else "robust"
    if not static_graph and path == "dense":
        path = "sparse"  # the graph changes every round: mix through the round's neighbour table
    if (not plain or not static_graph) and agg.gossip == "dense":
        raise ConfigError("aggregation.gossip=\"dense\" applies only to plain mean gossip on a static graph "
                          "without attacks or pre-aggregation; use \"auto\"")

    model = models.make(cfg.model.name, ds.num_classes, ds.input_shape, cfg.model.hidden,
                        dtype=cfg.model.compute_dtype, conv=cfg.model.conv)
    local = LocalSpec(apply=model.apply, optimizer=tr.optimizer, momentum=tr.momentum > 0, batch_size=tr.batch_size,
                      local_steps=tr.local_steps, dp_example=p.mode == "example", dp_buffer=plan.buffer,
                      unravel=model.unravel, apply_params=model.apply_params,
                      dp_clipping=models.dp_clipping(cfg.model.name, cfg.model.conv))
    attack_hyper = {k: att[k] for k in attacks.DEFAULTS.get(att.name, {})}
    spec = simulation.Spec(
        n=t.n, local=local, model_init=model.init, model_apply=model.apply, rounds=cfg.rounds,
        eval_every=cfg.eval_every, init=cfg.model.init, share=tr.share, order=tr.order, exchange=path, rule=agg.rule,
        rule_hyper=_freeze(rule_hyper), pre=tuple((n, _freeze(h)) for n, h in pre), attack=att.name,
        attack_hyper=_freeze(attack_hyper), privacy=p.mode, mechanism=p.mechanism,
        chunk_size=cfg.parallel.chunk_size or None, dynamic=t.dynamic,
        weights=t.weights if isinstance(t.weights, str) else "metropolis", n_edges=topo.num_edges,
        node_dropout=t.node_dropout > 0, stragglers=t.stragglers > 0,
        inter_every=t.inter_every if t.kind == "hierarchical" else 0, message_bytes=4 * model.dim,
        accuracy_threshold=cfg.accuracy_threshold)
    if path == "robust":  # a user's rule or attack is traced here, so a broken one fails with its name
        k = max(g.neighbors.shape[1] for g in pool)
        if not all(aggregators.shipped(name) for name in (agg.rule, *agg.pre)):
            aggregators.check_contract(agg.rule, rule_hyper, k, model.dim, pre)
        if not attacks.shipped(att.name):
            attacks.check_contract(att.name, attack_hyper, t.n, k, model.dim,
                                   receivers=simulation.exchange_chunk(spec, t.n, k, model.dim))
    mixing = topo.mixing if path == "dense" else np.zeros((1, 1))
    if cfg.eval_nodes and cfg.eval_nodes > honest.sum():
        raise ConfigError(f"eval_nodes={cfg.eval_nodes} exceeds the {int(honest.sum())} honest nodes")
    eval_ids = np.flatnonzero(honest)[: cfg.eval_nodes] if cfg.eval_nodes else np.arange(t.n)
    if cfg.eval_samples > len(ds.y_test):
        raise ConfigError(f"eval_samples={cfg.eval_samples} exceeds the {len(ds.y_test)} test examples of "
                          f"{ds.name}; allowed: 0 (all) to {len(ds.y_test)}")
    test = test_subset(len(ds.y_test), cfg.eval_samples, d.seed)
    pool_nbr, pool_mask = stack_tables(pool)
    arrays = simulation.Arrays(
        x=jnp.asarray(shards.x), y=jnp.asarray(y), sizes=jnp.asarray(shards.sizes),
        x_test=jnp.asarray(ds.x_test[test]), y_test=jnp.asarray(ds.y_test[test]),
        eval_ids=jnp.asarray(eval_ids, jnp.int32),
        mixing=jnp.asarray(mixing, jnp.float32), neighbors=jnp.asarray(topo.neighbors),
        mask=jnp.asarray(topo.mask), weights=jnp.asarray(topo.weights), byzantine=jnp.asarray(byz),
        edge_id=jnp.asarray(edge_ids(topo)), inter=jnp.asarray(inter_links(topo, t)),
        pool_neighbors=jnp.asarray(pool_nbr), pool_mask=jnp.asarray(pool_mask))
    hyper = make_hyper(cfg, z)
    return Experiment(cfg, topo, ds, shards, model, byz, spec, arrays, hyper, rates, plan, _devices(cfg),
                      _seed_mode(cfg))


def make_hyper(cfg: Config, noise_multiplier: float | None) -> dict[str, jax.Array]:
    """The dynamic values of a config (see :data:`jaxdfl.simulation.DYNAMIC`) as traced scalars."""
    t, tr, p = cfg.topology, cfg.train, cfg.privacy
    values = {"lr": tr.lr, "momentum": tr.momentum, "clip_norm": p.clip_norm,
              "noise_multiplier": noise_multiplier or 0.0, "drop_prob": t.drop_prob,
              "node_dropout": t.node_dropout, "stragglers": t.stragglers}
    return {k: jnp.float32(v) for k, v in values.items()}


def test_subset(n: int, samples: int, seed: int) -> np.ndarray | slice:
    """The test examples evaluated: all (``samples = 0``), or ``samples`` of the ``n`` drawn without replacement with
    ``data.seed`` (in file order), not a prefix: file-backed test sets are often sorted by label or difficulty."""
    if not samples or samples >= n:
        return slice(None)
    return np.sort(np.random.default_rng([seed, 0x7E57]).choice(n, samples, replace=False))


def edge_ids(topo: topology.Topology) -> np.ndarray:
    """``[N, K]`` index of the undirected edge behind each neighbour-table entry (-1 on self and padding)."""
    n = topo.n
    edges = topo.edges.astype(np.int64)  # (u < v), sorted: their keys u * N + v ascend
    i = np.arange(n, dtype=np.int64)[:, None]
    j = topo.neighbors.astype(np.int64)
    found = np.searchsorted(edges[:, 0] * n + edges[:, 1], np.minimum(i, j) * n + np.maximum(i, j))
    live = topo.mask.copy()
    live[:, 0] = False
    return np.where(live, found, -1).astype(np.int32)


def inter_links(topo: topology.Topology, t) -> np.ndarray:
    """``[N, K]`` True on the entries linking two clusters of a hierarchical topology."""
    if t.kind != "hierarchical":
        return np.zeros(topo.neighbors.shape, bool)
    cluster = topology.clusters(topo, topology.family_params(t.kind, t)["cluster_size"])
    return topo.mask & (cluster[topo.neighbors] != cluster[:, None])


def stack_tables(topos: list[topology.Topology]) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour tables and masks of several graphs padded to one width: ``[P, N, K]`` each."""
    k = max(tp.neighbors.shape[1] for tp in topos)
    n = topos[0].n
    nbr = np.tile(np.arange(n, dtype=np.int32)[None, :, None], (len(topos), 1, k))
    msk = np.zeros((len(topos), n, k), bool)
    for i, tp in enumerate(topos):
        nbr[i, :, : tp.neighbors.shape[1]] = tp.neighbors
        msk[i, :, : tp.mask.shape[1]] = tp.mask
    return nbr, msk


def _seed_mode(cfg: Config) -> str:
    """``parallel.seed_mode``: "auto" is "map" on a CPU backend and "vmap" on accelerators.

    Batching the seeds (vmap) multiplies every array by the seed count: on an accelerator that one seed leaves idle
    it is the fast layout, but on a CPU one seed's node axis already fills the cores and the larger working set
    only costs cache (``benchmarks/suite.py`` measured 8 vmapped seeds at 1.4-1.6x the time of 8 single-seed runs).
    "map" runs the seeds one after another inside the same compiled program (``lax.map``).
    """
    mode = cfg.parallel.seed_mode
    if mode == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return mode


def _devices(cfg: Config) -> int:
    """How many devices the node axis is split over (``parallel.devices``; must divide topology.n)."""
    available, n, want = jax.device_count(), cfg.topology.n, cfg.parallel.devices
    if want == "auto":
        return max(d for d in range(1, available + 1) if n % d == 0)
    if want > available:
        raise ConfigError(f"parallel.devices={want} but only {available} device(s) are visible")
    if n % want:
        raise ConfigError(f"parallel.devices={want} must divide topology.n={n} (the node axis is split evenly)")
    return want


def _listify(x):
    if isinstance(x, dict):
        return {k: _listify(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return [_listify(v) for v in x]
    return x


def _freeze(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _seed_keys(exp: Experiment):
    seeds = exp.seeds
    if seeds is None:
        return jax.random.key(exp.config.seed)
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def _over_seeds(exp: Experiment, fn, in_axes):
    """``fn`` over the seed axis (axis 0 of the arguments whose ``in_axes`` entry is 0; None: shared).

    ``seed_mode`` "vmap" batches the seeds; "map" runs them one after another in the same program (``lax.map``).
    Both stack the outputs on a leading seed axis and compile once whatever the number of seeds.
    """
    if exp.seeds is None:
        return fn
    if exp.seed_mode == "vmap":
        return jax.vmap(fn, in_axes=in_axes)

    def mapped(*args):
        per_seed = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

        def one(xs):
            it = iter(xs)
            return fn(*(next(it) if ax == 0 else a for a, ax in zip(args, in_axes)))

        return jax.lax.map(one, per_seed)

    return mapped


def compile_program(exp: Experiment):
    """Compile the whole experiment as one program (over all seeds when set). Returns ``(compiled, keys, s)``."""
    program = _over_seeds(exp, simulation.make_program(exp.spec), (0, None, None))
    keys = _seed_keys(exp)
    t0 = time.perf_counter()
    compiled = jax.jit(program).lower(keys, exp.hyper, exp.arrays).compile()
    return compiled, keys, time.perf_counter() - t0


def _mesh(exp: Experiment):
    """A 1-D device mesh over the node axis, or None for one device."""
    d = exp.devices
    if d <= 1:
        return None
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:d]), ("nodes",))


def _shard(exp: Experiment, tree, node_axis: int):
    """Place ``tree`` on the mesh: arrays whose axis ``node_axis`` has length N are split over devices."""
    mesh = _mesh(exp)
    if mesh is None:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec

    def put(leaf):
        if hasattr(leaf, "ndim") and leaf.ndim > node_axis and leaf.shape[node_axis] == exp.topology.n:
            spec = PartitionSpec(*([None] * node_axis), "nodes")
        else:
            spec = PartitionSpec()
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


class Runner:
    """An experiment's compiled program, reusable for configs that differ only in dynamic values.

    ``Runner(exp)`` compiles the init and round-segment programs once (see :func:`segment_chunks`);
    ``runner(exp_i)`` runs any experiment with the same static settings (see :func:`program_key`), e.g. another
    learning rate or noise multiplier, without recompiling.
    """

    def __init__(self, exp: Experiment):
        self.exp = exp
        c = exp.config
        self.components = components(c)
        seg_fn = simulation.make_segment(exp.spec, segment_chunks(c))
        self.node_axis = 1 if exp.seeds is not None else 0

        def init(key, hyper):
            k_init, k_rounds = jax.random.split(key)
            return simulation.init_state(exp.spec, k_init, hyper), k_rounds

        self.init = jax.jit(_over_seeds(exp, init, (0, None)))
        self.arrays = _shard(exp, exp.arrays, 0)
        t0 = time.perf_counter()
        state, k_rounds = self._start(exp)
        segment = jax.jit(_over_seeds(exp, seg_fn, (0, 0, None, None)))
        self.segment = segment.lower(state, k_rounds, exp.hyper, self.arrays).compile()
        self.compile_seconds = time.perf_counter() - t0
        self.calls = 0  # only the first run reports compile_seconds: the next ones reuse the program

    def _start(self, exp: Experiment):
        state, k_rounds = self.init(_seed_keys(exp), exp.hyper)
        return _shard(exp, state, self.node_axis), k_rounds

    def __call__(self, exp: Experiment | None = None, checkpoint_dir: str | None = None,
                 resume: bool = False, progress: Callable | None = None) -> Result:
        """Run ``exp`` (default: the compiled one) on its own arrays and return its :class:`Result`.

        ``progress(rounds_done, rounds)`` is called on the host after every segment.
        """
        exp = exp or self.exp
        _check_progress(progress)
        if runner_key(exp) != (program_key(self.exp), self.components):
            raise ValueError("Runner: this experiment differs from the compiled one in a static setting, its DP-SGD "
                             "buffer, its data or model shapes, or a registered rule, attack or model function")
        c = exp.config
        arrays = self.arrays if exp is self.exp else _shard(exp, exp.arrays, 0)
        state, k_rounds = self._start(exp)
        chunks: list[dict] = []
        if resume:
            path = checkpoint.latest(checkpoint_dir) if checkpoint_dir is not None else None
            if path is None:
                raise ConfigError(f"no checkpoint to resume from in {checkpoint_dir!r}")
            (state, k_rounds), meta, history = checkpoint.load(path, (state, k_rounds))
            # the devices and the seed layout a run used do not change its results: any may resume it
            stored = with_defaults(meta.get("config", {}))
            differ = [key for key in checkpoint.config_differences(stored, c.to_dict())
                      if key not in ("parallel.devices", "parallel.seed_mode")]
            # Without privacy a run may be extended (with DP, rounds set z, the buffer and epsilon), from a round
            # where this config's segments start.
            segment_rounds = segment_chunks(c) * c.eval_every
            if c.privacy.mode == "none" and meta["round"] <= c.rounds and meta["round"] % segment_rounds == 0:
                differ = [key for key in differ if key != "rounds"]
            if differ:
                raise ConfigError(f"checkpoint {path} was written by a run with another config (differs in "
                                  f"{', '.join(differ[:5])}): it cannot be resumed with this one")
            missing = sorted(set(self.segment.out_info[0]) - set(history))
            if missing:
                raise ConfigError(f"checkpoint {path} lacks the metrics {', '.join(missing)} (written by an older "
                                  "jaxdfl): it cannot be resumed; start the run again")
            state = _shard(exp, state, self.node_axis)
            chunks = [history]
            checkpoint.discard_partial(checkpoint_dir)  # what the resumed run's killed writes left
        elif checkpoint_dir is not None:
            checkpoint.clear(checkpoint_dir)  # an earlier run's checkpoints in this folder must not be resumed
        axis = 0 if exp.seeds is None else 1

        def joined():
            return {k: np.concatenate([h[k] for h in chunks], axis=axis) for k in chunks[0]}

        def all_diverged():  # non-finite honest models in every seed: stop, keep the metrics so far (a seed that
            # diverged alone runs on with NaN models, so the other seeds still equal their own runs); a resumed
            # history that already stopped so runs no further segment
            return bool(chunks) and bool(np.all(np.any(chunks[-1]["diverged"] > 0, axis=-1)))

        t0 = time.perf_counter()
        while _round(state) < c.rounds and not all_diverged():
            history, state = self.segment(state, k_rounds, exp.hyper, arrays)
            chunks.append(jax.tree.map(checkpoint.to_host, history))
            done = _round(state)
            if checkpoint_dir is not None and (done == c.rounds or (c.checkpoint_every
                                                                    and done % c.checkpoint_every == 0)):
                checkpoint.save(Path(checkpoint_dir), done, (state, k_rounds), {"config": c.to_dict()}, joined())
            if progress is not None:
                progress(done, c.rounds)
        run_s = time.perf_counter() - t0
        compile_s = self.compile_seconds if self.calls == 0 else 0.0
        self.calls += 1
        return finish(exp, until_all_diverged(joined(), axis), state, compile_s, run_s)


def until_all_diverged(history: dict, axis: int) -> dict:
    """``history`` up to and including the first evaluation by which every seed has diverged (all of it if none).

    A run stops at the end of the segment in which that happened, and segments follow ``checkpoint_every``: cutting
    at the evaluation makes ``rounds_done``, the metrics rows and ``final`` the same for every segment layout.
    """
    diverged = np.logical_or.accumulate(np.asarray(history["diverged"]) > 0, axis=-1)  # [E] or [S, E]
    every = diverged if diverged.ndim == 1 else np.all(diverged, axis=0)
    if not every.any():
        return history
    keep = int(np.argmax(every)) + 1
    return {k: np.take(v, np.arange(keep), axis=axis) for k, v in history.items()}


#: Config keys whose values reach the program as traced hyper-parameters (no recompilation when they change).
DYNAMIC_KEYS = ("train.lr", "privacy.clip_norm", "privacy.noise_multiplier", "privacy.target_epsilon", "seed",
                "topology.drop_prob")

#: Traced values too, but whether they are 0 is static (it removes the code path, or SGD's momentum buffer): only
#: that part is static.
FLAG_KEYS = ("train.momentum", "topology.node_dropout", "topology.stragglers")


def static_part(cfg: Config) -> dict:
    """The config without its dynamic values: two configs with equal static parts share one program."""
    tree = cfg.to_dict()
    for key in DYNAMIC_KEYS + FLAG_KEYS:
        node = tree
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        value = node.pop(leaf, None)
        if key in FLAG_KEYS:
            node[leaf] = bool(value)
    return tree


def components(cfg: Config) -> tuple:
    """The registered functions a config's program is traced from: its rule, pre-aggregators, attack and model."""
    agg = cfg.aggregation
    return (aggregators.REGISTRY.get(agg.rule), tuple(aggregators.PRE_REGISTRY.get(p) for p in agg.pre),
            attacks.REGISTRY.get(cfg.attack.name), models.MODELS.get(cfg.model.name))


def user_components(cfg: Config) -> list[str]:
    """The settings of ``cfg`` that name a user's registered function rather than jaxdfl's own, e.g.
    ``["aggregation.rule = 'mine'"]``: results stored under a config cannot tell an edited function from the old."""
    agg = cfg.aggregation
    named = [("aggregation.rule", agg.rule, aggregators.shipped), ("attack.name", cfg.attack.name, attacks.shipped),
             ("model.name", cfg.model.name, models.shipped), ("topology.kind", cfg.topology.kind, topology.shipped),
             ("data.name", cfg.data.name, data_mod.shipped)]
    named += [("aggregation.pre", p, aggregators.shipped) for p in agg.pre]
    return [f"{key} = {name!r}" for key, name, shipped in named if not shipped(name)]


def same_program(a: Config, b: Config) -> bool:
    return static_part(a) == static_part(b)


def program_key(exp: Experiment) -> tuple:
    """What fixes an experiment's compiled program: its static config, its DP-SGD buffer, and the shapes of its
    data and model.

    The buffer is a shape sized from the run's privacy target (:func:`plan_privacy`), so two configs that differ
    only in the noise multiplier or the target epsilon can need different programs; a program run with another
    experiment's buffer would not have the overflow probability its epsilon is accounted with. The shapes change
    under an unchanged config when a data file or a registered dataset is replaced, and the graph's edge count
    (the per-edge draws of matching and edge dropout) when a graph family is registered again.
    """
    shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(exp.arrays))
    return static_part(exp.config), exp.privacy.buffer, shapes, exp.model.dim, exp.spec.n_edges


def runner_key(exp: Experiment) -> tuple:
    """What a compiled program must share with ``exp`` to run it: :func:`program_key` and the registered rule,
    attack and model functions (:func:`components`; one re-registered under its name compiles anew)."""
    return program_key(exp), components(exp.config)


def runner_for(exp: Experiment, runners: list) -> Runner:
    """The Runner in ``runners`` (``(runner_key, Runner)`` pairs) whose program fits ``exp``; compiled and added to
    the list when there is none."""
    key = runner_key(exp)
    runner = next((r for k, r in runners if k == key), None)
    if runner is None:
        runner = Runner(exp)
        runners.append((key, runner))
    return runner


#: The program :func:`run` compiled last, kept for a next run that differs only in dynamic values.
_last_runner: Runner | None = None


def _check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a function progress(rounds_done, rounds) or None, got {progress!r}")


def run(cfg: Config | dict | str | Experiment, progress: Callable | None = None, checkpoint_dir: str | None = None,
        resume: bool = False) -> Result:
    """Run one experiment end to end and return its :class:`Result`.

    Args:
      cfg: a Config (see :func:`jaxdfl.load_config`), a config dict tree, a TOML path, or an experiment already
        built from one (:func:`build`).
      progress: optional ``progress(rounds_done, rounds)``, called on the host after each segment of rounds.
      checkpoint_dir: where checkpoints go (every ``checkpoint_every`` rounds; 0 = only at the end). A fresh run
        first removes the checkpoints already there.
      resume: continue from the newest checkpoint in ``checkpoint_dir`` (same final metrics, bit for bit); it must
        come from a run with the same config (without privacy, ``rounds`` may grow: the run is extended).

    The rounds run as segments (:func:`segment_chunks`) that call the same compiled program; a run whose honest
    models turn non-finite (in every seed) stops after the segment that diverged, and its history ends at the
    first evaluation that saw it (:func:`until_all_diverged`), whatever the segments. The last compiled program is
    kept: a next run whose config differs only in dynamic values (:data:`DYNAMIC_KEYS`, e.g. the learning rate or
    the seed), and whose rule, attack and model are still the same registered functions (:func:`components`: a
    rule edited and registered again under its name compiles anew), and whose DP-SGD buffer is the same
    (:func:`program_key`), reuses it without tracing or compiling (its summary's ``compile_seconds`` is 0, as in a
    sweep's rows after the first of a program). Settings the config leaves without effect
    (:func:`jaxdfl.config.inert_settings`) raise an
    :class:`~jaxdfl.config.InertSettingWarning`.
    """
    global _last_runner
    _check_progress(progress)  # before building and compiling
    exp = cfg if isinstance(cfg, Experiment) else None
    cfg = exp.config if exp is not None else _as_config(cfg)
    for note in inert_settings(cfg):
        warnings.warn(note, InertSettingWarning, stacklevel=2)
    if _last_runner is not None and (not same_program(cfg, _last_runner.exp.config)
                                     or _last_runner.components != components(cfg)):
        _last_runner = None  # let the previous program and its arrays go before building the next
    exp = exp if exp is not None else build(cfg)
    if _last_runner is None or program_key(exp) != program_key(_last_runner.exp):
        _last_runner = None
        _last_runner = Runner(exp)
    return _last_runner(exp, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)


#: A run without checkpoints is cut into at most this many segments (the progress bar's steps).
MAX_SEGMENTS = 10


def segment_chunks(cfg: Config) -> int:
    """Evaluation chunks per compiled segment: one segment per checkpoint, or at most :data:`MAX_SEGMENTS`.

    Segments are one compiled program (rounds in ``lax.scan``) called one after another on the host, with the
    same result as a single call (round keys are folded from the round index). With checkpoints a segment ends at
    every multiple of ``checkpoint_every`` and at ``rounds``: ``gcd(checkpoint_every, rounds)`` rounds, so that a
    ``checkpoint_every`` that does not divide ``rounds`` never runs past ``rounds``. Without checkpoints the segment
    is the smallest divisor of the chunk count that leaves at most ``MAX_SEGMENTS`` segments (one segment when
    the count is prime and larger), so that a progress report costs at most ten host round trips and no host
    callback inside the program (JAX's persistent compilation cache skips programs with host callbacks).
    """
    n = cfg.rounds // cfg.eval_every
    if cfg.checkpoint_every:
        return math.gcd(cfg.checkpoint_every, cfg.rounds) // cfg.eval_every
    return next(d for d in range(1, n + 1) if n % d == 0 and n // d <= MAX_SEGMENTS)


def _round(state) -> int:
    return int(np.max(np.asarray(state.round)))


def finish(exp: Experiment, history: dict, state, compile_s: float, run_s: float) -> Result:
    """Add host-side metrics (epsilon) to a history and assemble the summary."""
    rounds_axis = np.asarray(history["round"])
    eval_rounds = rounds_axis if rounds_axis.ndim == 1 else rounds_axis[0]
    eps = np.array([exp.epsilon(int(r)) for r in eval_rounds])
    history["epsilon"] = eps if rounds_axis.ndim == 1 else np.broadcast_to(eps, rounds_axis.shape).copy()
    final = {k: history[k][..., -1] for k in METRICS}
    diverged = np.asarray(history["diverged"])
    first_bad = np.argmax(diverged > 0, axis=-1)
    summary: dict[str, Any] = {
        "rounds": exp.config.rounds,
        "rounds_done": int(eval_rounds[-1]),
        "nodes": exp.topology.n,
        "byzantine": int(exp.byzantine.sum()),
        "byzantine_ids": np.flatnonzero(exp.byzantine).tolist(),
        "degrees": np.asarray(exp.topology.degrees).tolist(),
        "parameters": exp.model.dim,
        "spectral_gap": exp.topology.spectral_gap,
        "effective_spectral_gap": effective_spectral_gap(exp),
        "exchange": exp.spec.exchange,
        "devices": exp.devices,
        "compile_seconds": compile_s,
        "run_seconds": run_s,
        "noise_multiplier": exp.noise_multiplier,
        "epsilon_per_node": (None if exp.config.privacy.mode == "none"
                             else exp.epsilons(int(eval_rounds[-1])).tolist()),
        "accuracy_per_node": accuracy_per_node(exp, history),
        "peak_bytes_estimate": peak_bytes(exp),
        "kept_own_share": _num(np.mean(history["kept_own_share"])),
        "inert_settings": inert_settings(exp.config),
        "diverged": bool(np.any(diverged > 0)),
        "diverged_round": None,
    }
    if summary["diverged"]:
        bad = int(np.min(np.where(np.any(diverged > 0, axis=-1), first_bad, 10**9)))
        summary["diverged_round"] = int(eval_rounds[bad])
    # A divergence stop cuts the metrics at an evaluation, but the returned state (and a checkpoint of it) is where
    # the program stopped, at its segment's end: its models may have trained, and spent privacy, for more rounds.
    summary["state_round"] = _round(state)
    summary["state_epsilon"] = (None if exp.config.privacy.mode == "none"
                                else _num_or_inf(exp.epsilon(summary["state_round"])))
    if rounds_axis.ndim == 1:
        summary["final"] = {k: _final(v, k) for k, v in final.items()}
    else:
        summary["seeds"] = exp.seeds
        summary["final"] = {k: _final(np.mean(v), k) for k, v in final.items()}
        # the sample std over seeds; undefined (null) for a single seed, where 0 would read as "no spread"
        with np.errstate(invalid="ignore"):  # the spread of infinite values (epsilon at z = 0) is NaN: null
            summary["final_std"] = {k: _num(np.std(v, ddof=1)) if len(v) > 1 else None for k, v in final.items()}
        summary["final_per_seed"] = {k: [_final(x, k) for x in v] for k, v in final.items()}
        summary["diverged_seeds"] = [s for s, d in zip(exp.seeds, np.any(diverged > 0, axis=-1)) if d]
    return Result(exp.config, history, summary, state)


#: :func:`effective_spectral_gap`'s stochastic power iteration: graphs per step, steps, batches for the final estimate,
#: and the largest round table (N x K entries) it is computed for.
GAP_BATCH, GAP_STEPS, GAP_FINAL, GAP_MAX_ENTRIES = 32, 48, 32, 1 << 19


@functools.partial(jax.jit, static_argnums=0)
def _round_graph_draws(spec, hyper, arrays, keys, rounds):
    """The round graphs drawn from ``keys [B]`` at ``rounds [B]``: ``(neighbors [B, N, K], weights [B, N, K])``, 0
    weight on masked entries. Compiled once per graph spec (:func:`jaxdfl.simulation.graph_spec`) and shape."""

    def draw(key, r):
        k_graph, k_online = jax.random.split(key)
        g = simulation.round_graph(spec, hyper, arrays, k_graph, r, simulation.online_nodes(spec, hyper, k_online))
        return g.neighbors, jnp.where(g.mask, g.weights, 0.0)

    return jax.vmap(draw)(keys, rounds)


def effective_spectral_gap(exp: Experiment, seed: int = 0) -> float | None:
    """The mean-square mixing rate of the graphs a run draws, as a spectral gap: ``1 - sqrt(lambda_2(E[W^T W]))``.

    Definition: for i.i.d. doubly stochastic mixing matrices W(t), one round shrinks the mean squared disagreement
    ``E |x - mean(x)|^2`` by at most ``lambda_2(E[W^T W])``, its second largest eigenvalue (Boyd et al. 2006); on a
    static graph ``1 - sqrt(lambda_2(W^T W)) = 1 - |lambda_2(W)|`` is the spectral gap, returned without sampling.
    Estimated by stochastic power iteration on the disagreement subspace: each of :data:`GAP_STEPS` steps applies
    the mean of ``W^T W`` over :data:`GAP_BATCH` fresh round graphs, drawn as the program draws them
    (:func:`jaxdfl.simulation.round_graph`, node dropout included, consecutive round indices for periodic bridges);
    the Rayleigh quotient of the result over :data:`GAP_FINAL` more batches is the estimate.

    References: S. Boyd, A. Ghosh, B. Prabhakar, D. Shah, "Randomized gossip algorithms", IEEE Trans. Inf. Theory
    2006.

    Returns:
        The estimate (1.0 when the sampled draws average exactly: nothing left to mix), or None when a round's
        table has more than :data:`GAP_MAX_ENTRIES` entries.
    """
    if not exp.spec.graph_changes:
        return exp.topology.spectral_gap
    n, k = exp.arrays.neighbors.shape
    if n * max(k, 2) > GAP_MAX_ENTRIES:
        return None
    spec = simulation.graph_spec(exp.spec)
    hyper = {name: exp.hyper[name] for name in ("drop_prob", "node_dropout") if name in exp.hyper}
    graph_arrays = exp.arrays._replace(x=None, y=None, sizes=None, x_test=None, y_test=None, mixing=None,
                                       byzantine=None, eval_ids=None)
    keys = jax.random.split(jax.random.key(seed), GAP_STEPS + GAP_FINAL)

    def mean_wtw(y, step):
        """``mean_b W_b^T W_b y`` over one batch of round graphs."""
        r = jnp.arange(step * GAP_BATCH, (step + 1) * GAP_BATCH, dtype=jnp.int32)
        draw_keys = jax.random.split(keys[step], GAP_BATCH)
        nbr, w = map(np.asarray, _round_graph_draws(spec, hyper, graph_arrays, draw_keys, r))
        wy = np.einsum("bik,bik->bi", w, y[nbr])
        flat = (np.arange(GAP_BATCH)[:, None, None] * n + nbr).ravel()
        return np.bincount(flat, (w * wy[:, :, None]).ravel(), GAP_BATCH * n).reshape(GAP_BATCH, n).mean(0)

    def disagreement(y):
        """``y`` minus its mean, normalised; None when nothing is left (the draws averaged exactly)."""
        y = y - y.mean()
        norm = np.linalg.norm(y)
        return y / norm if norm > 1e-12 else None

    y = disagreement(np.random.default_rng(seed).normal(size=n))
    for step in range(GAP_STEPS):
        y = disagreement(mean_wtw(y, step))
        if y is None:  # e.g. two nodes matched every round, or near-complete graphs that rarely drop a node
            return 1.0
    lam = np.mean([y @ mean_wtw(y, GAP_STEPS + i) for i in range(GAP_FINAL)])
    return float(1.0 - np.sqrt(min(max(lam, 0.0), 1.0)))


def accuracy_per_node(exp: Experiment, history: dict) -> list[float | None]:
    """Each node's final test accuracy (mean over seeds), indexed by node id; None for Byzantine nodes and nodes
    outside ``eval_nodes``."""
    last = np.asarray(history["accuracy_per_node"])[..., -1, :]  # [E_nodes] or [S, E_nodes]
    if last.ndim == 2:
        last = last.mean(axis=0)
    out: list[float | None] = [None] * exp.topology.n
    for node, acc in zip(np.asarray(exp.arrays.eval_ids).tolist(), last.tolist()):
        out[node] = None if math.isnan(acc) else acc
    return out


def peak_bytes(exp: Experiment) -> int:
    """Estimated peak memory of a round, in bytes (float32), summed over the devices the node axis is split over.

    Node state (parameters, round-start copy, message, aggregate, optimizer moments: about 6 x N x D) once per
    seed, the data shards and test set, and a working set: the robust exchange's (``simulation.
    exchange_temporaries`` neighbourhood blocks of K x D per receiver, for the receivers of one chunk: see
    ``simulation.exchange_chunk``) and DP-SGD's per-example gradients (N x buffer x D, an upper bound), once per
    seed when the seeds are batched (``seed_mode = "vmap"``), once when they run one after another.
    """
    n, d = exp.spec.n, exp.model.dim
    k = int(exp.arrays.neighbors.shape[1])
    seeds = len(exp.seeds) if exp.seeds is not None else 1
    data = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (exp.arrays.x, exp.arrays.x_test))
    work = 0
    if exp.spec.exchange == "robust":
        receivers = simulation.exchange_chunk(exp.spec, n, k, d) or n
        work += int(receivers * simulation.exchange_temporaries(exp.spec, k, d) * k * d * 4)
    if exp.spec.local.dp_example:
        work += n * exp.spec.local.dp_buffer * d * 4
    return int(seeds * 6 * n * d * 4 + data + (seeds if exp.seed_mode == "vmap" else 1) * work)


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _num_or_inf(x) -> float | None:
    """``float(x)``, None for NaN: an infinite epsilon (no noise) stays inf, unlike no privacy at all (None)."""
    x = float(x)
    return None if np.isnan(x) else x


def _final(values, key: str):
    return _num_or_inf(values) if key == "epsilon" else _num(values)
