"""Sweeps over settings (host side): grids, privacy-utility curves, resumable result tables.

Settings that differ only in dynamic values (:data:`jaxdfl.experiment.DYNAMIC_KEYS` and, beyond whether they are
0, :data:`~jaxdfl.experiment.FLAG_KEYS`: learning rate, momentum, clipping norm, noise multiplier / target epsilon,
seed) share one compiled program; settings that change shapes (N, the graph, the model, the rule) compile one after
another.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdfl import experiment, results
from jaxdfl.config import Config, parse_value, plain
from jaxdfl.errors import ConfigError

FINAL = ("accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean", "consensus_distance", "epsilon")


def parse_grid(items: Iterable[str]) -> list[tuple[str, list]]:
    """``["train.lr=0.1,0.05", "topology.kind=ring,torus"]`` -> ``[("train.lr", [0.1, 0.05]), ...]``."""
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like key=v1,v2,...")
        key, text = item.split("=", 1)
        key = key.strip()
        grid.append((key, [parse_value(v.strip(), key) for v in _split_top(text)]))
    return checked_grid(grid)


def checked_grid(grid: Sequence[tuple[str, Iterable]] | Mapping[str, Iterable]) -> list[tuple[str, list]]:
    """``grid`` as ``[(key, [values])]`` with plain Python values, or a ConfigError: each key once, with a list of
    at least one value, no value twice (a mapping ``{key: values}`` is taken in its order)."""
    if isinstance(grid, str):
        raise ConfigError(f"grid must be a list of (key, values) pairs, got {grid!r}")
    out = []
    for item in grid.items() if isinstance(grid, Mapping) else grid:
        if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2 or not isinstance(item[0], str):
            raise ConfigError(f"grid entries must be (key, values) pairs, got {item!r}")
        key, values = item
        # a 0-d array counts as Iterable, yet iterating it fails
        scalar = not isinstance(values, Iterable) or getattr(values, "ndim", 1) == 0
        if scalar or isinstance(values, (str, bytes, Mapping)):
            raise ConfigError(f"grid {key}: the values must be a list, e.g. [{values!r}], got {values!r}")
        values = plain(list(values))
        if not values:
            raise ConfigError(f"grid {key}: give at least one value")
        if key in (k for k, _ in out):
            raise ConfigError(f"grid {key} is given twice; list all its values in one entry (one --grid)")
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise ConfigError(f"grid {key} lists {repeated[0]!r} more than once")
        out.append((key, values))
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets, so list values like [32,16] survive."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def expand(base: Config, grid: Sequence[tuple[str, Iterable]] | Mapping[str, Iterable]
           ) -> list[tuple[dict[str, Any], Config]]:
    """The cartesian product of ``grid`` (see :func:`checked_grid`) over ``base``: ``[(overrides, config), ...]`` (all
    validated first)."""
    grid = checked_grid(grid)  # NumPy grids as the lists TOML gives
    keys = [k for k, _ in grid]
    out = []
    for values in itertools.product(*(v for _, v in grid)):
        overrides = dict(zip(keys, values, strict=True))
        with _named(f"setting {setting_id(overrides)}"):
            out.append((overrides, base.replace(overrides)))
    return out


@contextlib.contextmanager
def _named(what: str):
    """Re-raise a ConfigError as one line that starts with ``what`` (the setting or target it came from)."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None


def check_settings(settings: Iterable[tuple[dict[str, Any], Config]]) -> None:
    """Build every setting once on the host (:func:`jaxdfl.experiment.build`: graphs, data, Byzantine placement,
    rule sizes, privacy calibration), so that a setting's config error stops a sweep before its first compile,
    not after the settings before it ran.

    The experiments are let go (keeping them would hold every setting's data on the device at once); building one
    again in its turn costs about 0.05 s on the quickstart (the calibration of z is cached).

    Raises:
      ConfigError naming the setting, then the setting's own one-line message.
    """
    for overrides, cfg in settings:
        with _named(f"setting {setting_id(overrides)}"):
            experiment.build(cfg)


def setting_id(overrides: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in overrides.items()) or "base"


def config_id(cfg: Config) -> str:
    """Short hash of a whole resolved config: names a setting's folder and marks it done in ``sweep.csv``, so a
    changed grid, ``--set`` or ``--seeds`` never mistakes another run's results for this one's."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _rows_for(sid: str, overrides: Mapping[str, Any], result: experiment.Result) -> list[dict[str, Any]]:
    s = result.summary
    base = {"setting": sid, "config": config_id(result.config),
            **{k: json.dumps(v) if isinstance(v, list) else v for k, v in overrides.items()},
            "spectral_gap": s["spectral_gap"], "effective_spectral_gap": s.get("effective_spectral_gap"),
            "compile_seconds": s["compile_seconds"],
            "run_seconds": s["run_seconds"], "diverged": s["diverged"]}
    if "final_per_seed" in s:
        return [{**base, "seed": seed, **{k: s["final_per_seed"][k][i] for k in FINAL}}
                for i, seed in enumerate(s["seeds"])]
    return [{**base, "seed": result.config.seed, **{k: s["final"][k] for k in FINAL}}]


def _read_done(path: Path) -> tuple[list[dict], set[str]]:
    if not path.exists():
        return [], set()
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, {r.get("config") for r in rows}


def _write_rows(path: Path, rows: list[dict]) -> None:
    header: list[str] = []
    for r in rows:
        header += [k for k in r if k not in header]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header)
    w.writeheader()
    w.writerows(rows)
    results.atomic_write(path, buf.getvalue())


#: The plots :func:`run_grid` draws at the top of its folder (from the settings' folders, after the last one).
PLOTS = ("accuracy.png", "accuracy_vs_gap.png")


def _start_folder(out: Path, rows: list[dict]) -> None:
    """Leave no file of an earlier grid at the top of ``out``: sweep.csv keeps this grid's rows (it is removed when
    there are none) and the plots go until they are drawn again, so a sweep stopped midway, or one whose graph
    does not vary (no accuracy_vs_gap.png), does not show another grid's results beside its own."""
    for name in PLOTS:
        (out / name).unlink(missing_ok=True)
    for name in ("sweep.csv", *PLOTS):  # what killed writes left of them and of the settings' files
        results.remove_temporaries(out, glob.escape(name))
    for folder in out.glob("settings/*"):
        results.remove_temporaries(folder)
    if rows:
        _write_rows(out / "sweep.csv", rows)
    else:
        (out / "sweep.csv").unlink(missing_ok=True)


def run_grid(base: Config, grid: Sequence[tuple[str, list]], out: str | Path | None = None,
             log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every setting of ``grid`` (each with all of ``base.seeds``), reusing compiled programs.

    With ``out``: rows go to ``out/sweep.csv`` (rewritten atomically after every setting), each setting's
    resolved config, history and summary to ``out/settings/<config_id>/``, and settings whose whole config is
    already in sweep.csv (:func:`config_id`) are skipped, so an interrupted sweep restarted with the same command
    continues where it stopped, and a changed grid, ``--set`` or ``--seeds`` runs what changed. sweep.csv holds the
    current grid's rows only. Every setting to run is built first (:func:`check_settings`), so a config error in
    any of them stops the sweep before anything compiles. Returns the rows.
    """
    settings = expand(base, grid)
    out = Path(out) if out is not None else None
    rows, done = _read_done(out / "sweep.csv") if out else ([], set())
    ids = [config_id(cfg) for _, cfg in settings]
    # every config error before the first compile (settings done earlier are not run again)
    check_settings(s for s, cid in zip(settings, ids, strict=True) if cid not in done)
    current = set(ids)  # sweep.csv keeps this grid's rows only; other configs'
    rows = [r for r in rows if r.get("config") in current]  # results stay in their settings/<hash>/ folders
    if out:
        _start_folder(out, rows)
    runners: list[tuple[tuple, experiment.Runner]] = []
    for index, ((overrides, cfg), cid) in enumerate(zip(settings, ids, strict=True)):
        sid = setting_id(overrides)
        if cid in done:
            if log:
                mine = experiment.user_components(cfg)
                log(f"[{index + 1}/{len(settings)}] {sid}: done earlier, skipped" + (
                    f" (it uses your {', '.join(mine)}: to run it again after editing that function, delete its "
                    f"row from sweep.csv)" if mine else ""))
            continue
        exp = experiment.build(cfg)
        result = experiment.runner_for(exp, runners)(exp)
        rows += _rows_for(sid, overrides, result)
        if out:
            folder = out / "settings" / cid
            results.atomic_write(folder / "config.toml", cfg.to_toml())
            header, hist_rows = results.history_rows(result.history, result.summary.get("seeds"))
            results.write_csv(folder / "metrics.csv", header, hist_rows)
            results.write_json(folder / "summary.json", {"setting": sid, **result.summary})
            _write_rows(out / "sweep.csv", rows)
        if log:
            f = result.summary["final"]
            log(f"[{index + 1}/{len(settings)}] {sid}: accuracy {f['accuracy_mean']:.4f}")
    if out:
        plot_sweep(out, settings)
    return rows


def plot_sweep(out: Path, settings) -> None:
    """accuracy vs round per setting; final accuracy vs spectral gap when the topology varies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    finals = []
    for overrides, cfg in settings:
        path = out / "settings" / config_id(cfg) / "metrics.csv"
        if not path.exists():
            continue
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        rounds = sorted({int(r["round"]) for r in rows})
        acc = [np.mean([float(r["accuracy_mean"]) for r in rows if int(r["round"]) == t]) for t in rounds]
        ax.plot(rounds, acc, label=setting_id(overrides))
        summary = json.loads((path.parent / "summary.json").read_text())
        gap = summary.get("effective_spectral_gap") or summary["spectral_gap"]  # the rate of the graphs run
        finals.append((gap, acc[-1], setting_id(overrides)))
    ax.set_xlabel("round")
    ax.set_ylabel("honest mean test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    results.save_figure(out / "accuracy.png", fig)
    if len({round(g, 12) for g, _, _ in finals}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        gaps, accs, labels = zip(*finals, strict=True)
        ax.scatter(gaps, accs)
        for g, a, lab in finals:
            ax.annotate(lab, (g, a), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("spectral gap (effective on changing graphs)")
        ax.set_ylabel("final honest mean accuracy")
        ax.grid(alpha=0.3)
        results.save_figure(out / "accuracy_vs_gap.png", fig)


# --------------------------------------------------------------------------------------------- privacy-utility


class PrivacyUtility:
    """Accuracy as a function of the privacy budget for one config, reusing one compiled program.

    ``curve(epsilons)`` runs the experiment at each target epsilon (the noise multiplier calibrated on the host);
    ``smallest_epsilon(target_accuracy)`` searches epsilon by bisection on a log scale, using that accuracy grows
    with epsilon (less noise), instead of a grid.

    With ``out``, ``out/privacy_utility.csv`` (epsilon, accuracy, the target's :func:`config_id`) is rewritten
    atomically after every target, and the targets it already holds for this config are read back instead of run:
    a study stopped midway continues where it stopped when started again.
    """

    def __init__(self, base: Config, log: Callable[[str], None] | None = None, out: str | Path | None = None):
        if base.privacy.mode == "none":
            raise ConfigError("privacy.mode must be \"example\" or \"update\" for a privacy-utility study")
        self.base = base
        self.log = log
        self.runners: list[tuple[tuple, experiment.Runner]] = []
        self.cache: dict[float, float] = {}
        self.path = Path(out) / "privacy_utility.csv" if out is not None else None
        if self.path is not None:
            results.remove_temporaries(self.path.parent, glob.escape(self.path.name))
            for row in _read_done(self.path)[0]:
                eps = float(row["epsilon"])
                if row.get("config") == config_id(self._config(eps)):
                    self.cache[eps] = float(row["accuracy"])

    def _save(self) -> None:
        """Rewrite privacy_utility.csv with this study's targets (after each new one: an earlier study's file stays
        until this study has a result of its own to replace it with)."""
        if self.path is not None:
            _write_rows(self.path, [{"epsilon": e, "accuracy": a, "config": config_id(self._config(e))}
                                    for e, a in sorted(self.cache.items())])

    def _config(self, eps: float) -> Config:
        return self.base.replace({"privacy.target_epsilon": float(eps), "privacy.noise_multiplier": None})

    def check(self, epsilons: Sequence[float]) -> None:
        """Build each target's experiment on the host (calibrating z; cached for the run), so that a config error
        at any target stops the study before its first compile. Raises ConfigError naming the epsilon."""
        for eps in epsilons:
            if float(eps) not in self.cache:
                with _named(f"epsilon {eps:g}"):
                    experiment.build(self._config(eps))

    def accuracy(self, eps: float) -> float:
        eps = float(eps)
        if eps not in self.cache:
            exp = experiment.build(self._config(eps))
            result = experiment.runner_for(exp, self.runners)(exp)
            self.cache[eps] = float(np.mean(result.summary["final"]["accuracy_mean"]))
            self._save()
            if self.log:
                self.log(f"epsilon {eps:.4g} (z = {exp.noise_multiplier:.4f}): accuracy {self.cache[eps]:.4f}")
        return self.cache[eps]

    def curve(self, epsilons: Sequence[float]) -> list[tuple[float, float]]:
        """``[(epsilon, accuracy), ...]``; every target is built (:meth:`check`) before the first runs."""
        self.check(epsilons)
        return [(float(e), self.accuracy(e)) for e in epsilons]

    def smallest_epsilon(self, target_accuracy: float, lo: float = 0.1, hi: float = 64.0,
                         rel_tol: float = 0.05, max_runs: int = 12) -> float | None:
        """Smallest epsilon in [lo, hi] (to ``rel_tol``) reaching ``target_accuracy``; None if hi does not."""
        if self.accuracy(hi) < target_accuracy:
            return None
        if self.accuracy(lo) >= target_accuracy:
            return lo
        for _ in range(max_runs):
            if hi / lo <= 1 + rel_tol:
                break
            mid = float(np.sqrt(lo * hi))
            if self.accuracy(mid) >= target_accuracy:
                hi = mid
            else:
                lo = mid
        return hi

    def plot(self, path, target_accuracy: float | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = sorted(self.cache.items())
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        if target_accuracy is not None:
            ax.axhline(target_accuracy, color="0.5", ls="--", label=f"target {target_accuracy}")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel(f"epsilon (delta = {self.base.privacy.delta:g})")
        ax.set_ylabel("final honest mean accuracy")
        ax.set_title(f"privacy-utility, privacy.mode = {self.base.privacy.mode}")
        ax.grid(alpha=0.3)
        results.save_figure(Path(path), fig)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
