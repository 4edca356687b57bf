"""Experiment configuration: defaults in one place, TOML loading, dotted overrides, validation.

A config is a nested mapping with the sections ``topology data model train aggregation attack privacy
parallel`` and the top-level keys ``seed``, ``seeds``, ``rounds``, ``eval_every``. Every key has a default here
(:data:`DEFAULTS`); family-specific keys (a topology's ``degree``, a rule's ``tau``, an attack's ``scale``) are
checked against the registries of the component that owns them, so a misspelt key is an error, never ignored.

Everything here is host-side: it runs before anything is compiled.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

from jaxdfl.errors import ConfigError

#: Fixed keys and their defaults. ``None`` means "unset"; :data:`TYPES` gives the type such a key takes.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "seeds": None,
    "rounds": 100,
    "eval_every": 10,
    "checkpoint_every": 0,
    "accuracy_threshold": 0.8,
    "eval_nodes": 0,
    "eval_samples": 0,
    "topology": {
        "kind": "ring",
        "n": 16,
        "weights": "metropolis",
        "seed": 0,
        "dynamic": "static",
        "drop_prob": 0.0,
        "node_dropout": 0.0,
        "stragglers": 0.0,
        "inter_every": 1,
        "pool": 16,
    },
    "data": {
        "name": "digits",
        "path": "",
        "partition": "iid",
        "alpha": 0.5,
        "shards_per_node": 2,
        "test_fraction": 0.2,
        "seed": 0,
        "synthetic_alpha": 1.0,
        "synthetic_beta": 1.0,
        "synthetic_samples": 0,
        "quantity_skew": "none",
        "quantity_alpha": 1.0,
        "mnist1d_samples": 5000,
        "mnist1d_seed": 42,
    },
    "model": {"name": "mlp", "hidden": [64], "init": "same", "compute_dtype": "float32", "conv": "auto"},
    "train": {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.0,
        "batch_size": 32,
        "local_steps": 1,
        "share": "model",
        "order": "atc",
    },
    "aggregation": {"rule": "mean", "pre": [], "gossip": "auto"},
    "attack": {"name": "none", "byzantine": 0, "placement": "random", "ids": [], "seed": 0},
    "privacy": {
        "mode": "none",
        "mechanism": "gaussian",
        "clip_norm": 1.0,
        "noise_multiplier": None,
        "target_epsilon": None,
        "delta": 1e-5,
        "accountant": "rdp",
    },
    "parallel": {"devices": "auto", "chunk_size": 0, "seed_mode": "auto"},
}

#: Types of keys whose default is ``None`` or a list.
TYPES: dict[str, type | tuple[type, ...]] = {
    "seeds": (list, int),
    "privacy.noise_multiplier": float,
    "privacy.target_epsilon": float,
    "parallel.devices": (str, int),
    "topology.weights": (str, list),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "topology.dynamic": ("static", "resample", "matching", "edge_dropout"),
    "data.partition": ("iid", "dirichlet", "shards"),
    "data.quantity_skew": ("none", "dirichlet", "power"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.conv": ("auto", "xla", "im2col"),
    "model.init": ("same", "independent"),
    "parallel.seed_mode": ("auto", "vmap", "map"),
    "train.optimizer": ("sgd", "adam"),
    "train.share": ("model", "update"),
    "train.order": ("atc", "cta", "parallel"),
    "aggregation.gossip": ("auto", "dense", "sparse"),
    "attack.placement": ("random", "degree", "ids"),
    "privacy.mode": ("none", "example", "update"),
    "privacy.mechanism": ("gaussian", "laplace"),
    "privacy.accountant": ("rdp", "pld"),
}


class Config(Mapping):
    """A validated, read-only experiment configuration.

    Sections read as attributes (``cfg.train.lr``) or items (``cfg["train"]["lr"]``). Build one with
    :func:`load_config` or :func:`make_config`; derive variants with :meth:`replace`.
    """

    def __init__(self, tree: Mapping[str, Any]):
        self._tree = _freeze(tree)

    def __getitem__(self, key):
        return self._tree[key]

    def __iter__(self):
        return iter(self._tree)

    def __len__(self):
        return len(self._tree)

    def __getattr__(self, name):
        try:
            return self._tree[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self):
        return f"Config({json.dumps(self.to_dict(), default=str)})"

    def __eq__(self, other):
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def to_dict(self) -> dict[str, Any]:
        """A plain, mutable deep copy (lists and dicts)."""
        return _thaw(self._tree)

    def replace(self, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
        """A new validated config with dotted overrides, e.g. ``{"topology.n": 64}`` or ``["topology.n=64"]``.

        Changing a family (``topology.kind``, ``aggregation.rule``, ``attack.name``) drops the old family's settings
        that the new one does not take (a sweep over rules must not trip over the previous rule's ``tau``), and the
        ones still at the old family's default: the new family starts from its own defaults (``large_norm``'s
        ``scale`` is 1e6, not ``sign_flip``'s 1). A setting both take that was set to another value carries over
        (``aggregation.f`` across rules).
        """
        return make_config(self.to_dict(), overrides)

    def to_toml(self) -> str:
        """The config as TOML text (``None`` values are left out, since TOML has no null)."""
        return dumps_toml(self.to_dict())


class _Section(dict):
    """Read-only dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *a, **k):
        raise TypeError("Config is read-only: use Config.replace({'section.key': value})")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly


def _freeze(x):
    if isinstance(x, Mapping):
        return _Section({k: _freeze(v) for k, v in x.items()})
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


def _thaw(x):
    if isinstance(x, Mapping):
        return {k: _thaw(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [_thaw(v) for v in x]
    return x


def with_defaults(tree: Mapping) -> dict:
    """``tree`` plus every key of :data:`DEFAULTS` it lacks, at its default (a config stored by an older jaxdfl,
    before a setting existed, ran with that setting's default)."""
    return _merge(DEFAULTS, tree, prefix="")


#: (section, key) pairs that pick a family whose members take different settings.
FAMILY_SELECTORS = {("topology", "kind"), ("aggregation", "rule"), ("attack", "name")}


def _switch_family(tree: dict, key: str, value: Any) -> None:
    """Before override ``key = value`` changes a family, drop from ``tree`` the old family's settings that the new one
    does not take or that are still at the old family's default (see :meth:`Config.replace`)."""
    section, _, field = key.partition(".")
    sec = tree.get(section)
    if (section, field) not in FAMILY_SELECTORS or not isinstance(sec, dict):
        return
    current = sec.get(field, DEFAULTS[section][field])
    if not isinstance(current, str) or not isinstance(value, str) or current == value:
        return
    old, new = _family_defaults(section, current), _family_defaults(section, value)
    tree[section] = {k: v for k, v in sec.items() if k not in old or (k in new and old[k] != v)}


def _family_defaults(section: str, name: str) -> dict[str, Any]:
    """The settings family ``name`` of ``section`` takes (beyond the section's fixed keys), with their defaults.

    The pre-aggregators' tables (``aggregation.nnm``, ...) go with every rule: their default is ``_ANY_RULE``, which
    no value equals.
    """
    from jaxdfl import aggregators, attacks, topology

    if section == "topology":
        return topology.PARAMS.get(name, {})
    if section == "aggregation":
        return {**aggregators.DEFAULTS.get(name, {}), **dict.fromkeys(aggregators.PRE_REGISTRY, _ANY_RULE)}
    return attacks.DEFAULTS.get(name, {})


_ANY_RULE = object()

#: The key that picks a section's family (see :data:`FAMILY_SELECTORS`).
_SELECTOR = {section: field for section, field in FAMILY_SELECTORS}


def _pre_taking(key: str) -> list[str]:
    """The pre-aggregators that take the setting ``key``."""
    from jaxdfl import aggregators

    return sorted(p for p in aggregators.PRE_REGISTRY if key in aggregators.DEFAULTS.get(p, {}))


def _members_taking(section: str, key: str) -> list[str]:
    """The members of ``section``'s family (topology kinds, rules, attacks) that take the setting ``key``."""
    from jaxdfl import aggregators, attacks, topology

    if section not in _SELECTOR:
        return []
    table = {"topology": topology.PARAMS, "attack": attacks.DEFAULTS}.get(section)
    if table is None:
        table = {k: v for k, v in aggregators.DEFAULTS.items() if k not in aggregators.PRE_REGISTRY}
    return sorted(name for name, params in table.items() if key in params)


#: Datasets whose examples come with the package or are generated: ``data.path`` does not apply.
_NO_PATH = ("digits", "synthetic", "mnist1d")


class InertSettingWarning(UserWarning):
    """A setting given a value that the rest of the config leaves without effect (see :func:`inert_settings`)."""


def graph_changes(topology: Mapping[str, Any]) -> bool:
    """Whether a ``[topology]`` section's graph changes per round: time-varying, node dropout or periodic bridges
    (the config-side twin of :attr:`jaxdfl.simulation.Spec.graph_changes`)."""
    return topology["dynamic"] != "static" or topology["node_dropout"] > 0 or topology["inter_every"] > 1


def plain_gossip(cfg: Config) -> bool:
    """Whether the exchange is plain mean gossip (dense or sparse mixing): no robust rule, attack or pre-aggregator."""
    agg = cfg.aggregation
    return agg.rule == "mean" and cfg.attack.name == "none" and not agg.pre


def inert_settings(cfg: Config) -> list[str]:
    """Settings given a non-default value that the rest of the config leaves without effect, one line each.

    They are accepted, not errors, so that a grid can hold its baseline (``privacy.mode`` none next to a privacy
    target, ``attack.byzantine`` 0 next to an attack); ``jaxdfl run`` prints them as notes, :func:`jaxdfl.run`
    warns (:class:`InertSettingWarning`), and ``summary.json`` lists them under ``inert_settings``.
    """
    from jaxdfl import aggregators, attacks, data, models, topology

    out = []

    def inert(section: str, keys, reason: str) -> None:
        defaults = {**DEFAULTS[section], **_family_defaults(section, cfg[section].get(_SELECTOR.get(section)))}
        for key in keys:
            value = cfg[section].get(key)
            said = any(line.startswith(f"{section}.{key} = ") for line in out)  # one reason per setting
            if value is not None and _thaw(value) != _thaw(defaults.get(key)) and not said:
                out.append(f"{section}.{key} = {_thaw(value)!r} has no effect: {reason}")

    p, a, d, t = cfg.privacy, cfg.attack, cfg.data, cfg.topology
    if p.mode == "none":
        inert("privacy", [k for k in DEFAULTS["privacy"] if k != "mode"], 'privacy.mode = "none"')
    elif p.mechanism == "laplace":
        inert("privacy", ["accountant", "delta"], "the Laplace mechanism composes pure epsilon")
    if a.byzantine == 0:
        inert("attack", ["name", "placement", "ids", "seed", *_family_defaults("attack", a.name)],
              "attack.byzantine = 0")
    if d.partition != "dirichlet":
        inert("data", ["alpha"], f"data.partition = {d.partition!r}")
    if d.partition != "shards":
        inert("data", ["shards_per_node"], f"data.partition = {d.partition!r}")
    if d.quantity_skew == "none":
        inert("data", ["quantity_alpha"], 'data.quantity_skew = "none"')
    if d.name != "synthetic":
        inert("data", ["synthetic_alpha", "synthetic_beta", "synthetic_samples"], f"data.name = {d.name!r}")
    if d.name != "mnist1d":
        inert("data", ["mnist1d_samples", "mnist1d_seed"], f"data.name = {d.name!r}")
    if d.name in _NO_PATH:
        inert("data", ["path"], f"data.name = {d.name!r} needs no files")
    if t.dynamic != "resample":
        inert("topology", ["pool"], f"topology.dynamic = {t.dynamic!r}")
    if topology.shipped(t.kind) and t.kind not in topology.RANDOM_KINDS:
        inert("topology", ["seed", "dynamic"] if t.dynamic == "resample" else ["seed"],
              f"topology.kind = {t.kind!r} is not drawn at random")
    if t.dynamic == "matching":
        inert("topology", ["weights"], "a matching round weighs each pair 1/2")
    if t.kind == "hierarchical" and topology.family_params(t.kind, t)["cluster_size"] >= t.n:
        inert("topology", ["inter_every"], f"one cluster holds all {t.n} nodes, so there are no bridge links")
    shipped_model = models.shipped(cfg.model.name)  # a user's model is handed hidden and conv: it may read them
    if shipped_model and cfg.model.name not in ("mlp", "cnn"):
        inert("model", ["hidden"], f"model.name = {cfg.model.name!r} has a fixed architecture")
    if shipped_model and cfg.model.name not in models.CONV_MODELS:
        inert("model", ["conv"], f"model.name = {cfg.model.name!r} has no convolution")
    if data.shipped(d.name) and d.name not in data.SPLIT_BY_FRACTION:
        inert("data", ["test_fraction"], f"data.name = {d.name!r} comes with its own test set")
    if a.placement != "random":
        inert("attack", ["seed"], f"attack.placement = {a.placement!r} is not drawn at random")
    if a.name in ("alie", "ipm") and not a.get("adaptive", False):
        inert("attack", ["search_max"], "attack.adaptive = false")
    agg = cfg.aggregation
    if agg.rule == "clipped_gossip":
        adaptive = bool(agg.get("adaptive"))
        radius = "the distance of the (m - f)-th closest of the m neighbours" if adaptive else "tau"
        inert("aggregation", ["tau"] if adaptive else ["f"],
              f"aggregation.adaptive = {str(adaptive).lower()} (the radius is {radius})")
    if not plain_gossip(cfg):
        inert("aggregation", ["gossip"], "a robust rule, attack or pre-aggregator exchanges through the robust path")
        # bucketing averages by weight; dissensus and isolation aim with them; other rules may be user rules
        uses_weights = (agg.rule not in aggregators.UNWEIGHTED_RULES or not aggregators.shipped(agg.rule)
                        or "bucketing" in agg.pre  # validation keeps aggregation.pre a list of names
                        or (a.byzantine > 0 and a.name in attacks.WEIGHTED_ATTACKS))
        if not uses_weights and t.dynamic != "matching":
            inert("topology", ["weights"], f"aggregation.rule = {agg.rule!r} ignores mixing weights (only the "
                  "reported spectral gap uses them)")
    else:
        inert("parallel", ["chunk_size"], "plain mean gossip does not chunk its receivers")
    if cfg.get("seeds") is None:
        inert("parallel", ["seed_mode"], "seeds is not set")
    if t.kind == "torus" and t.get("rows", 0) == t.get("cols", 0) == 0:
        rows, cols = topology._factor_square(t.n)
        if min(rows, cols) == 1:
            out.append(f"topology.kind = 'torus' with topology.n = {t.n} is a 1 x {t.n} grid: a ring")
    return out


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> Config:
    """Load a TOML config file (or the defaults when ``path`` is None) and apply dotted overrides.

    Args:
      path: a TOML file with the sections of :data:`DEFAULTS`.
      overrides: ``["topology.n=64", "train.lr=0.05"]`` (values parsed as TOML values, bare words as strings)
        or a mapping ``{"topology.n": 64}``.

    Raises:
      ConfigError: unknown keys, wrong types, values out of range (one line naming the key).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror or exc}") from None
    return make_config(tree, overrides)


def make_config(tree: Mapping[str, Any] | None = None,
                overrides: Iterable[str] | Mapping[str, Any] = ()) -> Config:
    """Merge ``tree`` and dotted ``overrides`` over :data:`DEFAULTS` and validate the result."""
    user = plain(dict(tree or {}))
    for key, value in _parse_overrides(overrides):
        value = plain(value)
        _switch_family(user, key, value)
        _set_dotted(user, key, value)
    merged = _merge(DEFAULTS, user, prefix="")
    _check_text(merged)
    validate(merged)
    return Config(merged)


def _check_text(tree: Mapping[str, Any], prefix: str = "") -> None:
    """Every string is Unicode text that config.toml can hold: a lone surrogate (what Python makes of undecodable
    bytes on the command line) has no UTF-8 or TOML form, so the run's config.toml could not be written."""
    for key, value in tree.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, Mapping):
                _check_text(v, f"{prefix}{key}.")
            elif isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise ConfigError(f"{prefix}{key} = {v!r} is not valid Unicode text (undecodable bytes?); "
                                      "give UTF-8 text") from None


def plain(value: Any) -> Any:
    """A copy of ``value`` made of the Python values a TOML file gives: NumPy (or JAX) scalars and arrays become
    numbers and lists, ranges and tuples lists, mappings dicts."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, range)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return plain(value.tolist())
    return copy.deepcopy(value)


def parse_value(text: str, key: str | None = None) -> Any:
    """Parse one override value as a TOML value; a bare word that is not TOML is taken as a string.

    For a ``key`` whose default is a string, a bare ``inf`` or ``nan`` is that name (``attack.name=inf``), not a
    float. For a ``key`` whose default is unset (None), a bare ``none`` or ``null`` unsets it (TOML has no null).
    """
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if any(c in text for c in "[]{}=\"'"):
            raise ConfigError(f"cannot parse value {text!r}: use TOML syntax, e.g. 3, 0.1, \"ring\", [1, 2]") from None
        if key and text.lower() in ("none", "null") and _unset_by_default(key):
            return None
        return text
    if isinstance(value, float) and not math.isfinite(value) and key and isinstance(_default_of(key), str):
        return text
    return value


def _unset_by_default(key: str) -> bool:
    """Whether ``key``'s default is None: in :data:`DEFAULTS`, or for a member of its section's family."""
    default = _default_of(key, missing=_MISSING)
    if default is not _MISSING:
        return default is None
    section, _, field = key.partition(".")
    if section not in _SELECTOR:
        return False
    return any(_family_defaults(section, name).get(field, 0) is None for name in _members_taking(section, field))


_MISSING = object()


def _default_of(key: str, missing: Any = None) -> Any:
    """``key``'s value in :data:`DEFAULTS`, or ``missing`` for a key DEFAULTS does not hold."""
    node: Any = DEFAULTS
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return missing
        node = node[part]
    return node


def _parse_overrides(overrides) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    if isinstance(overrides, str):  # it was read letter by letter ("override 't' must look like ...")
        raise ConfigError(f"overrides must be a list of 'section.key=value' strings, e.g. [{overrides!r}]")
    out = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        out.append((key, parse_value(text.strip(), key)))
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
    node[parts[-1]] = value


def _merge(defaults: Mapping, user: Mapping, prefix: str) -> dict:
    """Defaults overlaid with the user's values; family keys (unknown to DEFAULTS) are kept for validate()."""
    out = copy.deepcopy(dict(defaults))
    for key, value in user.items():
        name = f"{prefix}{key}"
        if prefix == "" and key not in defaults:
            raise ConfigError(f"unknown top-level key {name!r}; allowed: {', '.join(sorted(defaults))}")
        if isinstance(defaults.get(key), dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a section (a TOML table), got {value!r}")
            out[key] = _merge(defaults[key], value, prefix=f"{name}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------- validation


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list"}.get(t, str(t))


def _check_type(name: str, value: Any, expected) -> Any:
    """Check ``value`` against ``expected`` (ints are accepted where numbers are); returns the coerced value."""
    types = expected if isinstance(expected, tuple) else (expected,)
    for t in types:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool, list, dict) and isinstance(value, t):
            return value
    raise ConfigError(f"{name} must be {_type_name(expected)}, got {value!r}")


def _check_section(section: dict, defaults: Mapping, prefix: str, extra: Mapping[str, Any]) -> None:
    """Type-check a section's keys against DEFAULTS plus the family-specific ``extra`` defaults."""
    allowed = {**defaults, **extra}
    for key in list(section):
        name = f"{prefix}.{key}"
        if key not in allowed:
            owners = _members_taking(prefix, key)
            hint = (f": {prefix}.{_SELECTOR[prefix]} = {section.get(_SELECTOR[prefix])!r} does not take it "
                    f"(a setting of {', '.join(owners)})" if owners else "")
            pre = [p for p in _pre_taking(key) if p in section.get("pre", ())] if prefix == "aggregation" else []
            if pre:
                hint += f"; for the pre-aggregator write {' or '.join(f'{prefix}.{p}.{key}' for p in pre)}"
            raise ConfigError(f"unknown key {name!r}{hint}; allowed in [{prefix}]: {', '.join(sorted(allowed))}")
        default = allowed[key]
        value = section[key]
        if name in TYPES:
            if value is not None:
                section[key] = _check_type(name, value, TYPES[name])
        elif default is None:
            continue  # family key whose default is "unset": any TOML value, checked by its owner
        elif isinstance(default, bool):
            section[key] = _check_type(name, value, bool)
        elif isinstance(default, float):
            section[key] = _check_type(name, value, float)
        elif isinstance(default, int):
            section[key] = _check_type(name, value, int)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        elif isinstance(default, list | tuple) and not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if name in CHOICES and section[key] not in CHOICES[name]:
            raise ConfigError(f"{name} must be one of {', '.join(CHOICES[name])}; got {section[key]!r}")


def _positive(cfg, name, *, integer=False, allow_zero=False, upper=None):
    section, key = name.split(".") if "." in name else (None, name)
    value = cfg[section][key] if section else cfg[key]
    bad = value < 0 if allow_zero else value <= 0
    if bad or not math.isfinite(value) or (upper is not None and value > upper):
        rng = ">= 0" if allow_zero else "> 0"
        if upper is not None:
            rng += f" and <= {upper}"
        raise ConfigError(f"{name} must be {rng}, got {value!r}")


def _pre_defaults(name: str, cfg: dict) -> dict:
    """A pre-aggregator's settings by default. ``clip`` centres on the node's own vector when models are shared
    (clipping whole models around zero would be meaningless) and on zero when updates are."""
    from jaxdfl import aggregators

    out = dict(aggregators.DEFAULTS.get(name, {}))
    if name == "clip":
        out["self_centered"] = cfg["train"]["share"] == "model"
    return out


def _check_seed(name: str, value: int) -> None:
    if not 0 <= value < 2**32:
        raise ConfigError(f"{name} must be in [0, 2^32) (a uint32 key), got {value}")


def validate(cfg: dict) -> None:
    """Validate a merged config in place (types coerced, family keys checked). Raises ConfigError."""
    from jaxdfl import aggregators, attacks, models, topology
    from jaxdfl import data as data_mod

    for key in ("seed", "rounds", "eval_every", "checkpoint_every", "eval_nodes", "eval_samples"):
        cfg[key] = _check_type(key, cfg[key], int)
    cfg["accuracy_threshold"] = _check_type("accuracy_threshold", cfg["accuracy_threshold"], float)
    _check_seed("seed", cfg["seed"])
    if cfg["seeds"] is not None:
        seeds = cfg["seeds"]
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise ConfigError(f"seeds must be >= 1 or a list of ints, got {seeds!r}")
        elif not (isinstance(seeds, list | tuple) and seeds
                  and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise ConfigError(f"seeds must be a positive count or a non-empty list of ints, got {seeds!r}")
        elif len(set(seeds)) < len(seeds):  # repeated runs would understate the spread over seeds
            raise ConfigError(f"seeds must not repeat a seed, got {list(seeds)!r}")
        for s in ([cfg["seed"] + seeds - 1] if isinstance(seeds, int) else seeds):
            _check_seed("seeds", s)
    _positive(cfg, "rounds", integer=True)
    _positive(cfg, "eval_every", integer=True)
    if cfg["rounds"] % cfg["eval_every"]:
        raise ConfigError(f"eval_every must divide rounds: rounds={cfg['rounds']}, eval_every={cfg['eval_every']}")

    topo = cfg["topology"]
    if not isinstance(topo.get("kind"), str) or topo["kind"] not in topology.KINDS:  # first: it decides the keys
        raise ConfigError(f"topology.kind must be one of {', '.join(topology.KINDS)}; got {topo.get('kind')!r}")
    _check_section(topo, DEFAULTS["topology"], "topology", topology.PARAMS.get(topo["kind"], {}))
    if topo["n"] < 2:
        raise ConfigError(f"topology.n must be >= 2, got {topo['n']}")
    for key in ("drop_prob", "node_dropout", "stragglers"):
        if not 0.0 <= topo[key] < 1.0:
            raise ConfigError(f"topology.{key} must be in [0, 1), got {topo[key]}")
    if topo["inter_every"] < 1:
        raise ConfigError(f"topology.inter_every must be >= 1, got {topo['inter_every']}")
    if topo["inter_every"] > 1 and topo["kind"] != "hierarchical":
        raise ConfigError("topology.inter_every applies to kind = \"hierarchical\" only")
    if topo["drop_prob"] > 0 and topo["dynamic"] != "edge_dropout":
        raise ConfigError("topology.drop_prob needs topology.dynamic = \"edge_dropout\"")
    changing = graph_changes(topo)
    if not isinstance(topo["weights"], str) and changing:
        raise ConfigError("topology.weights: a user matrix needs a graph that stays fixed (topology.dynamic = "
                          "\"static\", no node_dropout, inter_every = 1); use \"metropolis\" or \"max_degree\"")
    if topo["pool"] < 1:
        raise ConfigError(f"topology.pool must be >= 1, got {topo['pool']}")
    _positive(cfg, "eval_nodes", allow_zero=True)
    _positive(cfg, "eval_samples", allow_zero=True)
    if not 0.0 <= cfg["accuracy_threshold"] <= 1.0:
        raise ConfigError(f"accuracy_threshold must be in [0, 1], got {cfg['accuracy_threshold']}")

    data = cfg["data"]
    _check_section(data, DEFAULTS["data"], "data", {})
    if data["name"] not in data_mod.DATASETS:
        raise ConfigError(f"data.name must be one of {', '.join(data_mod.DATASETS)}; got {data['name']!r}")
    _positive(cfg, "data.alpha")
    _positive(cfg, "data.shards_per_node", integer=True)
    _positive(cfg, "data.quantity_alpha")
    for key in ("synthetic_alpha", "synthetic_beta"):
        _positive(cfg, f"data.{key}", allow_zero=True)
    n_syn = data["synthetic_samples"]
    if n_syn < 0 or 0 < n_syn and n_syn - max(1, round(n_syn * data["test_fraction"])) < 1:
        raise ConfigError(f"data.synthetic_samples must be 0 (lognormal sizes) or leave at least one training "
                          f"example per node after the test_fraction split, got {n_syn}")
    if data["mnist1d_samples"] < 10 or data["mnist1d_samples"] % 10:
        raise ConfigError(f"data.mnist1d_samples must be a multiple of 10 (signals per class x 10), got "
                          f"{data['mnist1d_samples']}")
    if not 0 < data["test_fraction"] < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {data['test_fraction']}")

    model = cfg["model"]
    _check_section(model, DEFAULTS["model"], "model", {})
    if model["name"] not in models.MODELS:
        raise ConfigError(f"model.name must be one of {', '.join(models.MODELS)}; got {model['name']!r}")
    models.check_hidden(model["hidden"])

    train = cfg["train"]
    _check_section(train, DEFAULTS["train"], "train", {})
    _positive(cfg, "train.lr")
    _positive(cfg, "train.momentum", allow_zero=True)
    if train["momentum"] >= 1:
        raise ConfigError(f"train.momentum must be in [0, 1), got {train['momentum']}")
    if train["momentum"] > 0 and train["optimizer"] == "adam":
        raise ConfigError(f"train.momentum={train['momentum']} applies to optimizer = \"sgd\" only (adam keeps its own "
                          "moment decays 0.9 and 0.999); set it to 0 with adam")
    if train["share"] == "update" and model["init"] == "independent":
        raise ConfigError("train.share = \"update\" with model.init = \"independent\": nodes add aggregated updates to "
                          "their own models, so models that start apart never meet; use model.init = \"same\"")
    if train["share"] == "update" and train["order"] != "atc":
        raise ConfigError(f"train.order = \"{train['order']}\" needs train.share = \"model\" (an update exists only "
                          "after local training, so update sharing is adapt-then-combine); use train.order = \"atc\"")
    _positive(cfg, "train.batch_size", integer=True)
    _positive(cfg, "train.local_steps", integer=True)

    agg = cfg["aggregation"]
    rule = agg.get("rule")
    if not isinstance(rule, str) or rule not in aggregators.REGISTRY:
        raise ConfigError(f"aggregation.rule must be one of {', '.join(aggregators.REGISTRY)}; got {rule!r}")
    pre = agg.get("pre", [])
    if not isinstance(pre, list | tuple) or not all(isinstance(p, str) for p in pre):
        raise ConfigError(f"aggregation.pre must be a list of names from {', '.join(aggregators.PRE_REGISTRY)}")
    for p in pre:
        if p not in aggregators.PRE_REGISTRY:
            raise ConfigError(f"aggregation.pre: unknown pre-aggregator {p!r}; allowed: "
                              f"{', '.join(aggregators.PRE_REGISTRY)}")
    sub = {p: {} for p in aggregators.PRE_REGISTRY}
    _check_section(agg, DEFAULTS["aggregation"], "aggregation", {**aggregators.DEFAULTS.get(rule, {}), **sub})
    for p in aggregators.PRE_REGISTRY:
        if p in agg:
            if not isinstance(agg[p], Mapping):
                raise ConfigError(f"aggregation.{p} must be a table of {p}'s settings")
            if p not in pre:
                raise ConfigError(f"[aggregation.{p}] is set but {p!r} is not listed in aggregation.pre")
            merged = {**_pre_defaults(p, cfg), **agg[p]}
            _check_section(merged, {}, f"aggregation.{p}", aggregators.DEFAULTS.get(p, {}))
            agg[p] = merged
    for p in pre:
        agg.setdefault(p, _pre_defaults(p, cfg))
    for key, value in aggregators.DEFAULTS.get(rule, {}).items():
        agg.setdefault(key, value)

    att = cfg["attack"]
    name = att.get("name")
    if not isinstance(name, str) or name not in attacks.REGISTRY:
        raise ConfigError(f"attack.name must be one of {', '.join(attacks.REGISTRY)}; got {name!r}")
    _check_section(att, DEFAULTS["attack"], "attack", attacks.DEFAULTS.get(name, {}))
    for key, value in attacks.DEFAULTS.get(name, {}).items():
        att.setdefault(key, value)
    attacks.validate(name, {k: att[k] for k in attacks.DEFAULTS.get(name, {})})
    if att["byzantine"] < 0:
        raise ConfigError(f"attack.byzantine must be >= 0, got {att['byzantine']}")
    if 2 * att["byzantine"] >= topo["n"]:
        raise ConfigError(f"attack.byzantine must be below the honest count (< n/2 = {topo['n'] / 2:g}), "
                          f"got {att['byzantine']}")

    priv = cfg["privacy"]
    _check_section(priv, DEFAULTS["privacy"], "privacy", {})

    for section in ("topology", "data", "attack"):
        _check_seed(f"{section}.seed", cfg[section]["seed"])
    if topo["dynamic"] == "resample" and topo["seed"] + topo["pool"] > 2**32:
        raise ConfigError(f"topology.pool={topo['pool']}: the pool's graphs are drawn with seeds topology.seed to "
                          f"topology.seed + pool - 1, which must stay below 2^32 (topology.seed={topo['seed']})")

    par = cfg["parallel"]
    _check_section(par, DEFAULTS["parallel"], "parallel", {})
    dev = par["devices"]
    if isinstance(dev, str) and dev != "auto" or isinstance(dev, int) and dev < 1:
        raise ConfigError(f"parallel.devices must be \"auto\" or a positive integer, got {dev!r}")
    _positive(cfg, "parallel.chunk_size", allow_zero=True)
    ck = cfg["checkpoint_every"]
    if ck < 0 or ck % cfg["eval_every"] or ck > cfg["rounds"]:
        raise ConfigError(f"checkpoint_every must be 0 (off) or a multiple of eval_every ({cfg['eval_every']}) "
                          f"up to rounds ({cfg['rounds']}), got {ck}")
    _check_float32_range(cfg, "")


#: Magnitudes a float setting may have besides 0 (and a non-finite value where its key allows one): the simulator
#: computes in float32, where a learning rate of 1e-300 is 0 and a clip norm of 1e300 is inf.
FLOAT32_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)  # np.finfo(np.float32).tiny, .max


def _check_float32_range(tree: Mapping[str, Any], prefix: str) -> None:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _check_float32_range(value, name + ".")
        elif isinstance(value, float) and math.isfinite(value) and value != 0:
            lo, hi = FLOAT32_RANGE
            if not lo <= abs(value) <= hi:
                raise ConfigError(f"{name}={value!r} is outside float32's range (0, or magnitudes {lo:.3g} to "
                                  f"{hi:.3g}): the simulator computes in float32")


# --------------------------------------------------------------------------------------------- TOML output


def dumps_toml(tree: Mapping[str, Any]) -> str:
    """Serialise a config tree to TOML (scalars first, then one table per section; None omitted)."""
    lines: list[str] = []

    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            if isinstance(v, float) and not math.isfinite(v):
                return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
            return repr(v)
        if isinstance(v, str):
            # TOML basic string: JSON's escapes are TOML's too, except that TOML has no surrogate pairs (characters
            # beyond U+FFFF stay literal in the UTF-8 file) and DEL must be escaped.
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    def emit(table: Mapping, prefix: str):
        scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping) and v is not None}
        tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
        if prefix:
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {fmt(v)}")
        for k, v in tables.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(tree, "")
    return "\n".join(lines).lstrip("\n") + "\n"
