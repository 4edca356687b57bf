"""Robustness study: final honest accuracy for every (aggregation rule, attack) pair, on two graphs.

Rows are rules (with and without NNM pre-aggregation), columns attacks, cells the final mean honest test accuracy
averaged over the seeds of the base config (all seeds run in one program). Base configs live in
``configs/robustness/``; attack strengths are fixed below so that the table is reproducible. A cell a rule cannot
run (e.g. Krum on a ring: n - f - 2 < 1) is reported as n/a with the reason.

    python benchmarks/robustness.py [--graphs random_regular,ring] [--out benchmarks/results]

Writes ``robustness_<graph>.csv``, ``robustness_<graph>.png`` (heat-map) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path

# Accuracy study, not a speed benchmark: compile with XLA's backend optimisations off (halves compile time).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import numpy as np  # noqa: E402

import jaxdfl  # noqa: E402
from jaxdfl.errors import ConfigError  # noqa: E402
from jaxdfl.results import atomic_write, save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

RULES = ["mean", "median", "trimmed_mean", "krum", "geometric_median", "centered_clip", "clipped_gossip", "ios"]
ATTACKS = {
    "none": {},
    "sign_flip": {"attack.scale": 4.0},
    "large_norm": {},
    "gaussian": {"attack.sigma": 1.0},
    "alie": {"attack.z": 1.5},
    "ipm": {"attack.eps": 0.5},
    "dissensus": {"attack.eps": 1.5},
    "label_flip": {},
    # the strongest scale per receiver against the rule in use (line search); not in the default table
    "alie_adaptive": {"attack.name": "alie", "attack.adaptive": True},
    "ipm_adaptive": {"attack.name": "ipm", "attack.adaptive": True},
}
DEFAULT_ATTACKS = ["none", "sign_flip", "large_norm", "gaussian", "alie", "ipm", "dissensus", "label_flip"]
#: f per neighbourhood for the rules that take it, by graph
F = {"random_regular": 2, "ring": 1}
RULE_EXTRA = {"centered_clip": {"aggregation.tau": 1.0, "aggregation.iters": 3},
              "clipped_gossip": {"aggregation.adaptive": True}}


def cell(base, graph: str, rule: str, nnm: bool, attack: str) -> tuple[float | None, str]:
    overrides = {"aggregation.rule": rule, **RULE_EXTRA.get(rule, {}), "attack.name": attack, **ATTACKS[attack]}
    if "f" in jaxdfl.aggregators.DEFAULTS[rule]:
        overrides["aggregation.f"] = F[graph]
    if nnm:
        overrides["aggregation.pre"] = ["nnm"]
        overrides["aggregation.nnm"] = {"f": F[graph]}
    try:
        r = jaxdfl.run(base.replace(overrides))
    except ConfigError as exc:
        return None, str(exc)
    return float(r.summary["final"]["accuracy_mean"]), ""


def heatmap(path: Path, rows: list[str], cols: list[str], table: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 3.0, 0.42 * len(rows) + 1.6))
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("0.85")  # n/a cells in grey
    im = ax.imshow(np.ma.masked_invalid(table), vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = table[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    save_figure(path, fig)


def replot(out: Path) -> None:
    """Re-draw the heat-maps from the CSV files in ``out``."""
    for path in sorted(out.glob("robustness_*.csv")):
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        cols, names = rows[0][1:], [r[0] for r in rows[1:]]
        table = np.array([[float(v) if v else np.nan for v in r[1:]] for r in rows[1:]])
        heatmap(path.with_suffix(".png"), names, cols, table, f"{path.stem}: final honest accuracy")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="random_regular,ring")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help=f"from {', '.join(ATTACKS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the base configs, e.g. data.partition=dirichlet")
    ap.add_argument("--no-nnm", action="store_true", help="skip the rows with NNM")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--replot", action="store_true", help="only re-draw the heat-maps from existing CSVs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        return replot(out)
    rules, attacks = args.rules.split(","), args.attacks.split(",")
    for graph in args.graphs.split(","):
        base = jaxdfl.load_config(str(ROOT / "configs" / "robustness" / f"{graph}.toml"), args.set)
        names = [f"{r}{' + nnm' if nnm else ''}" for nnm in ((False,) if args.no_nnm else (False, True))
                 for r in rules]
        table = np.full((len(names), len(attacks)), np.nan)
        notes = {}
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            rule, nnm = name.split(" + ")[0], name.endswith("nnm")
            for j, attack in enumerate(attacks):
                acc, why = cell(base, graph, rule, nnm, attack)
                if acc is None:
                    notes[name] = why
                else:
                    table[i, j] = acc
                print(f"{graph:>14} {name:>22} {attack:>10}: {'n/a' if acc is None else f'{acc:.3f}'}",
                      file=sys.stderr, flush=True)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["rule", *attacks])
        for name, row in zip(names, table, strict=True):
            w.writerow([name, *("" if np.isnan(v) else f"{v:.4f}" for v in row)])
        stem = f"robustness_{graph}{'_' + args.tag if args.tag else ''}"
        atomic_write(out / f"{stem}.csv", buf.getvalue())
        b = base.attack.byzantine
        title = (f"{graph}, n={base.topology.n}, {b} Byzantine, f={F[graph]}, {base.rounds} rounds, "
                 f"{base.seeds} seeds{', ' + ' '.join(args.set) if args.set else ''}: final honest accuracy")
        heatmap(out / f"{stem}.png", names, attacks, table, title)
        print(f"\n### {title} ({time.perf_counter() - t0:.0f} s)\n")
        print("| rule | " + " | ".join(attacks) + " |")
        print("|---" * (len(attacks) + 1) + "|")
        for name, row in zip(names, table, strict=True):
            print(f"| {name} | " + " | ".join("n/a" if np.isnan(v) else f"{v:.2f}" for v in row) + " |")
        for name, why in notes.items():
            print(f"\n- {name}: n/a — {why}")


if __name__ == "__main__":
    main()
