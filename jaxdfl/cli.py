"""Command line: ``jaxdfl run CONFIG [--set key=value ...] [--out DIR]`` and friends.

The only module that parses arguments. Configuration errors print one line and exit with status 2 (``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jaxdfl.errors import ConfigError


class ProgressBar:
    """A text progress bar over evaluation chunks, drawn on stderr (called from inside the compiled program)."""

    def __init__(self, total: int, width: int = 30, stream=sys.stderr):
        self.total, self.width, self.stream = total, width, stream
        self.done = 0
        self.start = time.perf_counter()

    def __call__(self, index) -> None:
        import numpy as np

        self.done = max(self.done, int(np.max(np.asarray(index))) + 1)
        filled = int(self.width * self.done / self.total)
        secs = time.perf_counter() - self.start
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} chunks "
                          f"{secs:5.1f}s")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def summary_line(summary: dict) -> str:
    f = summary["final"]

    def fmt(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    parts = [f"rounds={summary['rounds']}", f"nodes={summary['nodes']}",
             f"acc={fmt(f['accuracy_mean'])} [min {fmt(f['accuracy_min'])}, max {fmt(f['accuracy_max'])}]",
             f"loss={fmt(f['loss_mean'])}", f"consensus={fmt(f['consensus_distance'], '.3g')}"]
    if f.get("epsilon") is not None:
        parts.append(f"epsilon={f['epsilon']:.3f}")
    parts.append(f"compile={summary['compile_seconds']:.1f}s run={summary['run_seconds']:.1f}s")
    if summary.get("diverged"):
        parts.append(f"DIVERGED at round {summary['diverged_round']}")
    return " ".join(parts)


def write_outputs(out: Path, result) -> None:
    """Resolved config, metrics.csv, summary.json and accuracy.png, each written atomically."""
    from jaxdfl import results

    results.atomic_write(out / "config.toml", result.config.to_toml())
    header, rows = results.history_rows(result.history)
    results.write_csv(out / "metrics.csv", header, rows)
    results.write_json(out / "summary.json", result.summary)
    results.plot_accuracy(out / "accuracy.png", result.history)


def cmd_run(args) -> int:
    from jaxdfl import config as config_mod
    from jaxdfl import experiment

    overrides = list(args.set or [])
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    cfg = config_mod.load_config(args.config, overrides)
    bar = ProgressBar(cfg.rounds // cfg.eval_every) if not args.quiet else None
    result = experiment.run(cfg, progress=bar)
    print(summary_line(result.summary))
    if args.out:
        write_outputs(Path(args.out), result)
        print(f"wrote {args.out}/{{config.toml,metrics.csv,summary.json,accuracy.png}}")
    return 1 if result.summary.get("diverged") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdfl", description="Decentralized federated learning simulator")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one experiment from a TOML config")
    p.add_argument("config", help="TOML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. topology.n=64")
    p.add_argument("--out", metavar="DIR", help="write config.toml, metrics.csv, summary.json, accuracy.png here")
    p.add_argument("--seeds", type=int, metavar="S", help="run S seeds (seed, seed+1, ...) in one program")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"jaxdfl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
