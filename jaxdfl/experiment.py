"""Running an experiment from a config (host side): build everything, compile once, run, account, report.

``build(cfg)`` turns a validated :class:`~jaxdfl.config.Config` into an :class:`Experiment` (topology, data shards,
model, Byzantine mask, the static :class:`~jaxdfl.simulation.Spec`, device arrays and dynamic hyper-parameters);
every setting is checked here, before anything is compiled. ``run(cfg)`` compiles the one program, runs it (all
seeds at once when ``seeds`` is set), computes the privacy spent on the host and returns a :class:`Result`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdfl import aggregators, attacks, byzantine, gossip, models, simulation, topology
from jaxdfl import data as data_mod
from jaxdfl.config import Config, load_config, make_config
from jaxdfl.errors import ConfigError
from jaxdfl.privacy import accounting, mechanisms
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
    noise_multiplier: float | None = None

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
                                               p.accountant)
        eps = accounting.update_epsilons(self.noise_multiplier, rounds_done, p.delta, p.mechanism, p.accountant)
        return np.full(self.topology.n, eps)


@dataclass
class Result:
    """What a run returns: ``history`` (metric -> ``[E]`` or ``[S, E]`` array) and ``summary`` (summary.json)."""

    config: Config
    history: dict[str, np.ndarray]
    summary: dict[str, Any]
    state: Any = field(default=None, repr=False)


def _privacy_setup(cfg: Config, shards: data_mod.Shards, honest: np.ndarray):
    """Validate privacy settings, pick the noise multiplier (calibrating to a target if asked)."""
    p = cfg.privacy
    accounting.validate(p.mode, p.mechanism, p.clip_norm, p.noise_multiplier, p.target_epsilon, p.delta,
                        p.accountant, int(shards.sizes.min()))
    rates = cfg.train.batch_size / shards.sizes.astype(np.float64)
    if p.mode == "none":
        return rates, None
    if p.noise_multiplier is not None:
        return rates, float(p.noise_multiplier)
    if p.mode == "example":
        steps = cfg.rounds * cfg.train.local_steps
        q = float(rates[honest].max())  # the smallest honest shard spends the most
        return rates, accounting.calibrate_noise(p.target_epsilon, q, steps, p.delta, p.accountant)
    return rates, accounting.calibrate_update(p.target_epsilon, cfg.rounds, p.delta, p.mechanism, p.accountant)


def build(cfg: Config | dict | str, progress: Callable | None = None) -> Experiment:
    """Build and validate an experiment from a config (a Config, a dict tree or a TOML path)."""
    if isinstance(cfg, str):
        cfg = load_config(cfg)
    elif not isinstance(cfg, Config):
        cfg = make_config(cfg)
    t, d, tr = cfg.topology, cfg.data, cfg.train
    topo_params = {k: v for k, v in t.items() if k not in ("kind", "n", "weights", "seed")}
    topo = topology.make(t.kind, t.n, seed=t.seed, weights=_listify(t.weights), **_listify(topo_params))
    ds = data_mod.load(d, t.n)
    att = cfg.attack
    byz = byzantine.place(t.n, att.byzantine, att.placement, seed=att.seed, degrees=topo.degrees,
                          ids=list(att.ids))
    shards = data_mod.partition(ds, t.n, d.partition, seed=d.seed, alpha=d.alpha,
                                shards_per_node=d.shards_per_node, min_size=1)
    if cfg.privacy.mode == "example" and tr.batch_size > shards.sizes.min():
        raise ConfigError(f"train.batch_size={tr.batch_size} exceeds the smallest shard ({shards.sizes.min()} "
                          f"examples); DP-SGD needs batch_size <= every node's shard size")
    y = shards.y
    if att.name in attacks.POISONING:
        y = np.where(byz[:, None], attacks.flip_labels(y, ds.num_classes), y)

    agg = cfg.aggregation
    rule_hyper = {k: agg[k] for k in aggregators.DEFAULTS[agg.rule]}
    pre = tuple((name, dict(agg[name])) for name in agg.pre)
    aggregators.validate(agg.rule, rule_hyper, topo.sizes, pre)

    honest = ~byz
    rates, z = _privacy_setup(cfg, shards, honest)
    p = cfg.privacy

    plain = agg.rule == "mean" and att.name == "none" and not agg.pre
    path = gossip.choose_path(t.n, topo.neighbors.shape[1], agg.gossip) if plain else "robust"
    if not plain and agg.gossip != "auto":
        raise ConfigError(f"aggregation.gossip={agg.gossip!r} applies only to plain mean gossip without attacks "
                          f"or pre-aggregation; use \"auto\"")

    model = models.make(cfg.model.name, ds.num_classes, ds.input_shape, cfg.model.hidden)
    dp_buffer = mechanisms.buffer_size(rates.max() * shards.sizes.max()) if p.mode == "example" else 0
    local = LocalSpec(apply=model.apply, optimizer=tr.optimizer, batch_size=tr.batch_size,
                      local_steps=tr.local_steps, dp_example=p.mode == "example", dp_buffer=int(dp_buffer))
    attack_hyper = {k: att[k] for k in attacks.DEFAULTS.get(att.name, {})}
    spec = simulation.Spec(
        n=t.n, local=local, model_init=model.init, model_apply=model.apply, rounds=cfg.rounds,
        eval_every=cfg.eval_every, init=cfg.model.init, share=tr.share, exchange=path, rule=agg.rule,
        rule_hyper=_freeze(rule_hyper), pre=tuple((n, _freeze(h)) for n, h in pre), attack=att.name,
        attack_hyper=_freeze(attack_hyper), privacy=p.mode, mechanism=p.mechanism, progress=progress)
    mixing = topo.mixing if path == "dense" else np.zeros((1, 1))
    arrays = simulation.Arrays(
        x=jnp.asarray(shards.x), y=jnp.asarray(y), sizes=jnp.asarray(shards.sizes),
        x_test=jnp.asarray(ds.x_test), y_test=jnp.asarray(ds.y_test),
        mixing=jnp.asarray(mixing, jnp.float32), neighbors=jnp.asarray(topo.neighbors),
        mask=jnp.asarray(topo.mask), weights=jnp.asarray(topo.weights), byzantine=jnp.asarray(byz))
    hyper = {"lr": jnp.float32(tr.lr), "momentum": jnp.float32(tr.momentum),
             "clip_norm": jnp.float32(p.clip_norm), "noise_multiplier": jnp.float32(z or 0.0)}
    return Experiment(cfg, topo, ds, shards, model, byz, spec, arrays, hyper, rates, z)


def _listify(x):
    if isinstance(x, dict):
        return {k: _listify(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return [_listify(v) for v in x]
    return x


def _freeze(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def compile_program(exp: Experiment):
    """Compile the experiment's program once (vmapped over seeds when set). Returns ``(compiled, keys, secs)``."""
    program = simulation.make_program(exp.spec)
    seeds = exp.seeds
    if seeds is None:
        keys = jax.random.key(exp.config.seed)
    else:
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        program = jax.vmap(program, in_axes=(0, None, None))
    t0 = time.perf_counter()
    compiled = jax.jit(program).lower(keys, exp.hyper, exp.arrays).compile()
    return compiled, keys, time.perf_counter() - t0


def run(cfg: Config | dict | str, progress: Callable | None = None) -> Result:
    """Run one experiment end to end and return its :class:`Result`.

    Args:
      cfg: a Config (see :func:`jaxdfl.load_config`), a config dict tree, or a TOML path.
      progress: optional ``progress(chunk_index)`` called from inside the program after each evaluation chunk.
    """
    exp = build(cfg, progress=progress)
    compiled, keys, compile_s = compile_program(exp)
    t0 = time.perf_counter()
    history, state = compiled(keys, exp.hyper, exp.arrays)
    history = jax.tree.map(np.asarray, history)
    run_s = time.perf_counter() - t0
    return finish(exp, history, state, compile_s, run_s)


def finish(exp: Experiment, history: dict, state, compile_s: float, run_s: float) -> Result:
    """Add host-side metrics (epsilon) to a history and assemble the summary."""
    honest = ~exp.byzantine
    rounds_axis = np.asarray(history["round"])
    eval_rounds = rounds_axis if rounds_axis.ndim == 1 else rounds_axis[0]
    eps_rows = [exp.epsilons(int(r)) for r in eval_rounds]
    eps = np.array([row[honest].max() for row in eps_rows])
    history["epsilon"] = eps if rounds_axis.ndim == 1 else np.broadcast_to(eps, rounds_axis.shape).copy()
    final = {k: history[k][..., -1] for k in METRICS}
    diverged = np.asarray(history["diverged"])
    first_bad = np.argmax(diverged > 0, axis=-1)
    summary: dict[str, Any] = {
        "rounds": exp.config.rounds,
        "nodes": exp.topology.n,
        "byzantine": int(exp.byzantine.sum()),
        "parameters": exp.model.dim,
        "spectral_gap": exp.topology.spectral_gap,
        "exchange": exp.spec.exchange,
        "compile_seconds": compile_s,
        "run_seconds": run_s,
        "noise_multiplier": exp.noise_multiplier,
        "epsilon_per_node": None if exp.config.privacy.mode == "none" else eps_rows[-1].tolist(),
        "diverged": bool(np.any(diverged > 0)),
        "diverged_round": None,
    }
    if summary["diverged"]:
        bad = int(np.min(np.where(np.any(diverged > 0, axis=-1), first_bad, 10**9)))
        summary["diverged_round"] = int(eval_rounds[bad])
    if rounds_axis.ndim == 1:
        summary["final"] = {k: _num(v) for k, v in final.items()}
    else:
        summary["seeds"] = exp.seeds
        summary["final"] = {k: _num(np.mean(v)) for k, v in final.items()}
        summary["final_std"] = {k: _num(np.std(v)) for k, v in final.items()}
        summary["final_per_seed"] = {k: [_num(x) for x in v] for k, v in final.items()}
    return Result(exp.config, history, summary, state)


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
