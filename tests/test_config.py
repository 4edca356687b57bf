"""Config loading, overrides and one-line validation errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxdfl import sweep
from jaxdfl.config import DEFAULTS, dumps_toml, load_config, make_config, parse_value
from jaxdfl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = make_config()
    assert cfg.topology.kind == DEFAULTS["topology"]["kind"]
    assert cfg["train"]["lr"] == DEFAULTS["train"]["lr"]


def test_overrides_parse_toml_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('rounds = 20\n[topology]\nkind = "random_regular"\nn = 12\ndegree = 3\n')
    cfg = load_config(str(path), ["topology.n=16", "train.lr=0.05", "model.hidden=[32, 16]", "data.name=digits"])
    assert cfg.topology.n == 16 and cfg.topology.degree == 3
    assert cfg.train.lr == pytest.approx(0.05)
    assert cfg.model.hidden == (32, 16)
    assert parse_value('"ring"') == "ring" and parse_value("ring") == "ring" and parse_value("3") == 3


def test_a_bare_inf_names_the_inf_attack_but_stays_a_float_for_numbers():
    # regression: `--set attack.name=inf` failed with "attack.name must be one of ..., inf, ...; got inf"
    cfg = load_config(str(ROOT / "configs" / "robustness" / "ring.toml"), ["attack.name=inf", "attack.value=-inf"])
    assert cfg.attack.name == "inf" and cfg.attack.value == float("-inf")
    assert parse_value("inf") == float("inf") and parse_value("nan", "attack.name") == "nan"
    assert sweep.parse_grid(["attack.name=sign_flip,inf"]) == [("attack.name", ["sign_flip", "inf"])]


def test_numpy_values_are_taken_as_the_python_values_toml_gives():
    """Regression: np.int64 for an int key, a NumPy array for a list key or range(3) for seeds were refused."""
    cfg = make_config({"topology": {"n": np.int64(8)}, "train": {"lr": np.float32(0.5)}, "seeds": range(3),
                       "attack": {"name": "sign_flip", "byzantine": 1, "ids": np.array([2])}},
                      {"train.batch_size": np.int32(4)})
    assert cfg.topology.n == 8 and type(cfg.topology.n) is int and type(cfg.train.batch_size) is int
    assert cfg.train.lr == 0.5 and cfg.seeds == (0, 1, 2) and cfg.attack.ids == (2,)
    assert cfg == make_config({"topology": {"n": 8}, "train": {"lr": 0.5, "batch_size": 4}, "seeds": [0, 1, 2],
                               "attack": {"name": "sign_flip", "byzantine": 1, "ids": [2]}})


def test_int_accepted_for_float():
    assert make_config({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize("tree, needle", [
    ({"topology": {"degre": 3}}, "topology.degre"),
    ({"bogus": 1}, "bogus"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"lr": -0.1}}, "train.lr"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"share": "both"}}, "train.share"),
    ({"topology": {"kind": "moebius"}}, "topology.kind"),
    ({"topology": {"n": 1}}, "topology.n"),
    ({"aggregation": {"rule": "avg"}}, "aggregation.rule"),
    ({"attack": {"name": "nuke"}}, "attack.name"),
    ({"attack": {"byzantine": 8}, "topology": {"n": 16}}, "attack.byzantine"),
    ({"privacy": {"mode": "maybe"}}, "privacy.mode"),
    ({"rounds": 10, "eval_every": 3}, "eval_every"),
    ({"model": {"hidden": [0]}}, "model.hidden"),
    ({"data": {"name": "imagenet"}}, "data.name"),
    ({"train": "fast"}, "train"),
    ({"topology": {"kind": "random_regulr", "degree": 4}}, "topology.kind"),  # said: unknown key topology.degree
    # a rule's setting with the default rule said only "unknown key": name the rules that take it
    ({"aggregation": {"f": 1}}, "'mean' does not take it (a setting of bulyan, clipped_gossip, ios, krum"),
    ({"topology": {"degree": 3}}, "topology.kind = 'ring' does not take it (a setting of random_regular)"),
    ({"aggregation": {"pre": ["clip"], "tau": 0.5}}, "for the pre-aggregator write aggregation.clip.tau"),
    ({"train": {"order": "cta", "share": "update"}}, "train.order"),
    ({"seeds": [1, 1]}, "seeds"),  # the spread over seeds would be understated
    ({"seeds": [True, False]}, "seeds"),
    ({"train": {"optimizer": "adam", "momentum": 0.9}}, "train.momentum"),  # was ignored by adam
    ({"train": {"share": "update"}, "model": {"init": "independent"}}, "train.share"),  # never reaches consensus
    ({"train": {"lr": 1e-300}}, "train.lr=1e-300 is outside float32"),  # was 0 in the program: no training
    ({"privacy": {"mode": "update", "clip_norm": 1e300}}, "privacy.clip_norm"),  # was inf
    ({"attack": {"name": "sign_flip", "byzantine": 1, "scale": -1e300}}, "attack.scale"),
    # the pool's last graph seed was refused naming a value no one gave (topology.seed=4294967296)
    ({"topology": {"kind": "erdos_renyi", "dynamic": "resample", "seed": 2**32 - 1}}, "topology.pool=16"),
])
def test_errors_name_the_key(tree, needle):
    with pytest.raises(ConfigError) as info:
        make_config(tree)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_config_is_read_only_and_replace_validates():
    cfg = make_config()
    with pytest.raises(TypeError):
        cfg.train["lr"] = 3
    assert cfg.replace({"train.lr": 0.3}).train.lr == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="train.lr"):
        cfg.replace({"train.lr": -1})


def test_toml_round_trip(tmp_path):
    cfg = make_config({"topology": {"kind": "torus", "n": 16, "rows": 4, "cols": 4}, "model": {"hidden": [8]}})
    path = tmp_path / "r.toml"
    path.write_text(dumps_toml(cfg.to_dict()))
    assert load_config(str(path)) == cfg


def test_undecodable_text_is_a_one_line_error_naming_the_key():
    """A lone surrogate (undecodable bytes from the command line) has no UTF-8 or TOML form: writing config.toml
    crashed with UnicodeEncodeError after the output folder had been cleared (review of stop 20)."""
    with pytest.raises(ConfigError, match="data.path = .* is not valid Unicode text"):
        make_config({"data": {"name": "npz", "path": "d\udcff.npz"}})


@pytest.mark.parametrize("text", ["data\U0001F600/d.npz", "caf\u00e9 \"q\" back\\slash", "tab\tnew\nline\x7fdel\x01"])
def test_strings_round_trip_through_the_written_toml(tmp_path, text):
    """A path with a character beyond U+FFFF, quotes, backslashes and control characters reads back as written
    (JSON's surrogate pairs and a raw DEL are not TOML: such a run's config.toml could not be resumed)."""
    cfg = make_config({"data": {"name": "npz", "path": text}})
    path = tmp_path / "r.toml"
    path.write_bytes(dumps_toml(cfg.to_dict()).encode())
    assert load_config(str(path)).data.path == text


def test_cli_config_error_exit_2_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[topology]\nkind = \"ring\"\nn = 8\ndegre = 2\n")
    proc = subprocess.run([sys.executable, "-m", "jaxdfl.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "topology.degre" in lines[0] and "Traceback" not in proc.stderr


def test_replace_switching_family_drops_settings_the_new_one_does_not_take():
    cfg = make_config({"topology": {"kind": "random_regular", "n": 12, "degree": 3},
                       "aggregation": {"rule": "centered_clip", "tau": 2.0},
                       "attack": {"name": "alie", "byzantine": 1, "z": 1.5}})
    ring = cfg.replace({"topology.kind": "ring"})
    assert "degree" not in ring.topology and ring.topology.n == 12
    median = cfg.replace({"aggregation.rule": "median"})
    assert "tau" not in median.aggregation
    krum = cfg.replace({"aggregation.rule": "trimmed_mean", "aggregation.f": 2}).replace({"aggregation.rule": "krum"})
    assert krum.aggregation.f == 2  # a setting both rules take carries over
    ipm = cfg.replace({"attack.name": "ipm"})
    assert "z" not in ipm.attack and ipm.attack.byzantine == 1
    with pytest.raises(ConfigError, match="topology.degre"):
        cfg.replace({"topology.degre": 3})  # typos are still errors



def test_switching_family_starts_from_the_new_familys_defaults():
    # regression: shared keys at the old family's default carried over (large_norm ran with sign_flip's scale 1)
    from jaxdfl import attacks

    cfg = make_config({"topology": {"kind": "small_world", "n": 12}, "attack": {"name": "sign_flip", "byzantine": 1}})
    assert cfg.replace({"attack.name": "large_norm"}).attack.scale == attacks.DEFAULTS["large_norm"]["scale"] != 1.0
    assert cfg.replace({"attack.name": "mimic"}).attack.target is None  # not sign_flip's "mean"
    ipm = cfg.replace({"attack.name": "ipm"})
    assert ipm.replace({"attack.name": "dissensus"}).attack.eps == attacks.DEFAULTS["dissensus"]["eps"]
    assert "p" not in cfg.replace({"topology.p": 0.1}).replace({"topology.kind": "erdos_renyi"}).topology
    chosen = cfg.replace({"attack.scale": 3.0}).replace({"attack.name": "large_norm"})
    assert chosen.attack.scale == 3.0  # a value the user chose carries over
    assert sweep.expand(cfg, [("attack.name", ["large_norm"])])[0][1].attack.scale == 1e6


def test_command_line_overrides_switch_families_as_replace_does():
    # regression: `--set aggregation.rule=mean` on mnist_attack.toml failed on clipped_gossip's `adaptive`
    path = str(ROOT / "configs" / "mnist_attack.toml")
    assert "adaptive" not in load_config(path, ["aggregation.rule=mean"]).aggregation
    assert load_config(path, ["aggregation.rule=trimmed_mean"]).aggregation.f == 1
    toml = load_config(path, ["attack.name=large_norm"])
    assert toml == load_config(path).replace({"attack.name": "large_norm"})
    with pytest.raises(ConfigError, match="attack.bogus"):  # unknown keys are still reported, not dropped
        make_config({"attack": {"name": "alie", "byzantine": 1, "bogus": 1}}, {"attack.name": "ipm"})


def test_a_rule_or_attack_registered_without_settings_needs_no_defaults(monkeypatch):
    from jaxdfl import aggregators, attacks, experiment

    monkeypatch.setitem(aggregators.REGISTRY, "own", lambda x, mask, weights=None: x[0])
    monkeypatch.setitem(attacks.REGISTRY, "same", lambda key, ctx: (ctx.block, ctx.mask))
    cfg = make_config({"topology": {"n": 6}, "aggregation": {"rule": "own"}, "attack": {"name": "same",
                                                                                      "byzantine": 1}})
    assert experiment.build(cfg).spec.rule == "own"
    with pytest.raises(ConfigError, match="attack.scale"):
        cfg.replace({"attack.scale": 2.0})


BUNDLED = ("digits", "synthetic")  # datasets that need no files


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_builds_when_its_data_is_bundled(path):
    from jaxdfl import experiment

    cfg = load_config(str(path))
    if cfg.data.name in BUNDLED:
        exp = experiment.build(cfg)
        assert exp.spec.n == cfg.topology.n


def test_clip_centres_on_the_own_model_by_default_when_models_are_shared():
    # regression: the default (zero-centred) was always refused with the default train.share = "model"
    from jaxdfl import experiment

    model = make_config({"aggregation": {"pre": ["clip"]}})
    assert model.aggregation.clip.self_centered is True
    experiment.build(model)
    assert make_config({"aggregation": {"pre": ["clip"]}, "train": {"share": "update"}}).aggregation.clip == {
        "tau": 1.0, "self_centered": False}
    with pytest.raises(ConfigError, match="self_centered"):  # an explicit zero-centred clip of models is refused
        experiment.build(make_config({"aggregation": {"pre": ["clip"], "clip": {"self_centered": False}}}))


@pytest.mark.parametrize("tree, needle", [
    ({"privacy": {"target_epsilon": 1.0}}, "privacy.target_epsilon"),
    ({"privacy": {"mode": "update", "mechanism": "laplace", "noise_multiplier": 50.0, "delta": 1e-8}},
     "privacy.delta"),
    ({"attack": {"name": "alie", "z": 1.0}}, "attack.z"),
    ({"data": {"alpha": 0.1}}, "data.alpha"),
    ({"data": {"path": "somewhere"}}, "data.path"),
    ({"topology": {"pool": 4}}, "topology.pool"),
    ({"model": {"name": "logreg", "hidden": [32]}}, "model.hidden"),
    ({"topology": {"kind": "torus", "n": 31}}, "a ring"),
    ({"topology": {"dynamic": "resample"}}, "topology.dynamic"),  # every pool graph of a ring is the ring
    ({"topology": {"seed": 5}}, "topology.seed"),
    ({"topology": {"kind": "complete", "dynamic": "matching", "weights": "max_degree"}}, "topology.weights"),
    ({"topology": {"kind": "hierarchical", "n": 8, "inter_every": 2}}, "topology.inter_every"),
    # found by a config fuzzer: accepted, ignored and not reported
    ({"topology": {"weights": "max_degree"}, "aggregation": {"rule": "median"}}, "topology.weights"),
    ({"aggregation": {"rule": "clipped_gossip", "f": 3}}, "aggregation.f"),
    ({"aggregation": {"rule": "clipped_gossip", "adaptive": True, "tau": 2.0}}, "aggregation.tau"),
    ({"attack": {"name": "alie", "byzantine": 1, "search_max": 5.0}}, "attack.search_max"),
    ({"attack": {"name": "crash", "byzantine": 1, "placement": "degree", "seed": 7}}, "attack.seed"),
    ({"aggregation": {"rule": "median", "gossip": "sparse"}}, "aggregation.gossip"),
    ({"parallel": {"chunk_size": 4}}, "parallel.chunk_size"),
    ({"parallel": {"seed_mode": "map"}}, "parallel.seed_mode"),
    ({"model": {"name": "mlp", "conv": "xla"}}, "model.conv"),
    ({"data": {"name": "npz", "path": "x.npz", "test_fraction": 0.5}}, "data.test_fraction"),
])
def test_settings_without_effect_are_reported(tree, needle):
    from jaxdfl.config import inert_settings

    notes = inert_settings(make_config(tree))
    assert len(notes) >= 1 and any(needle in n for n in notes) and all("\n" not in n for n in notes)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.toml")), ids=lambda p: p.stem)
def test_shipped_configs_and_the_defaults_have_no_inert_settings(path):
    from jaxdfl.config import inert_settings

    assert inert_settings(load_config(str(path))) == [] and inert_settings(make_config({})) == []


@pytest.mark.parametrize("tree", [
    {"topology": {"weights": "max_degree"}, "aggregation": {"rule": "median", "pre": ["bucketing"]}},  # weighs
    {"topology": {"weights": "max_degree"}, "aggregation": {"rule": "median"},
     "attack": {"name": "dissensus", "byzantine": 1}},  # aims with the weights
    {"topology": {"weights": "max_degree"}, "aggregation": {"rule": "ios"}},
    {"aggregation": {"rule": "clipped_gossip", "adaptive": True, "f": 2}},
    {"parallel": {"chunk_size": 4}, "attack": {"name": "crash", "byzantine": 1}},
    {"model": {"name": "cnn", "conv": "xla"}},
])
def test_settings_with_effect_are_not_reported(tree):
    from jaxdfl.config import inert_settings

    assert inert_settings(make_config(tree)) == []
