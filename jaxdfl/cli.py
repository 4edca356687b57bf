"""Command line: ``jaxdfl run CONFIG [--set key=value ...] [--out DIR]`` and friends.

The only module that parses arguments. Configuration errors print one line and exit with status 2 (``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import math
import os
import sys
import time
import warnings
from pathlib import Path

from jaxdfl.errors import ConfigError


class ProgressBar:
    """A text progress bar over rounds on stderr, called on the host as ``bar(rounds_done, rounds)`` after each
    segment of rounds (:func:`jaxdfl.experiment.segment_chunks`; all seeds advance together).

    On a terminal (``live``) the bar is redrawn in place; otherwise (a log file, a batch job's output) it writes a
    plain line when the run enters another tenth, so logs get at most eleven lines and no carriage returns.
    """

    def __init__(self, width: int = 30, stream=sys.stderr, live: bool | None = None):
        self.width, self.stream = width, stream
        self.live = bool(getattr(stream, "isatty", lambda: False)()) if live is None else live
        self.shown = -1  # the tenth of the run last written (plain lines)
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        tenth = 10 * done // total
        if not self.live and tenth == self.shown:
            return
        self.shown = tenth
        filled = int(self.width * done / total)
        secs = time.perf_counter() - self.start
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} rounds {secs:5.1f}s"
        if self.live:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
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
    if summary.get("kept_own_share"):
        parts.append(f"kept_own={summary['kept_own_share']:.3f}")
    parts.append(f"compile={summary['compile_seconds']:.1f}s run={summary['run_seconds']:.1f}s")
    if summary.get("diverged"):
        parts.append(f"DIVERGED at round {summary['diverged_round']}")
    return " ".join(parts)


#: The files ``jaxdfl run --out DIR`` writes in DIR (besides ``DIR/checkpoints/``).
RUN_FILES = ("config.toml", "metrics.csv", "consensus.csv", "nodes.csv", "summary.json", "accuracy.png",
             "consensus.png")


def clear_outputs(out: Path) -> None:
    """Remove an earlier run's files from ``out``: :data:`RUN_FILES`, the temporary files a killed write left of
    them, and the checkpoints. A fresh run calls it before writing anything, so that a run stopped midway never
    leaves its config.toml beside another run's results. Files the tool does not write stay."""
    from jaxdfl import checkpoint, results

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
        results.remove_temporaries(out, glob.escape(name))
    checkpoint.clear(out / "checkpoints")
    with contextlib.suppress(OSError):  # kept when it holds anything else
        (out / "checkpoints").rmdir()


def write_outputs(out: Path, result) -> None:
    """Resolved config, metrics.csv, consensus.csv, nodes.csv, summary.json, accuracy.png, consensus.png (atomic
    writes). ``nodes.csv``: one row per node with its degree, whether it is Byzantine, and its final accuracy."""
    import numpy as np

    from jaxdfl import results

    results.atomic_write(out / "config.toml", result.config.to_toml())
    seeds = result.summary.get("seeds")
    header, rows = results.history_rows(result.history, seeds)
    results.write_csv(out / "metrics.csv", header, rows)
    rounds, cons = results.per_round_consensus(result.history)
    cons_rows = [[r, *np.atleast_1d(cons[..., i]).tolist()] for i, r in enumerate(rounds)]
    header = ["round", "consensus_distance"] if seeds is None else ["round"] + [f"seed{s}" for s in seeds]
    results.write_csv(out / "consensus.csv", header, cons_rows)
    degrees, byzantine = result.summary["degrees"], set(result.summary["byzantine_ids"])
    results.write_csv(out / "nodes.csv", ["node", "degree", "byzantine", "accuracy"],
                      [[i, degrees[i], int(i in byzantine), "" if acc is None else acc]
                       for i, acc in enumerate(result.summary["accuracy_per_node"])])
    results.write_json(out / "summary.json", result.summary)
    results.plot_accuracy(out / "accuracy.png", result.history)
    results.plot_consensus(out / "consensus.png", result.history)


def _writable(target: Path, flag: str, path: str, what: str) -> None:
    """Raise ConfigError naming ``flag`` unless ``target`` is a folder, or can be made one: its nearest existing
    parent is a writable folder."""
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{flag} {path}: {probe} is a file; give {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: no permission to write in {probe}")


def out_folder(path: str, flag: str = "--out") -> Path:
    """``path`` as the folder a command writes, checked before anything is built: it is a folder, or can be made
    one (its nearest existing parent is a writable folder). Raises ConfigError naming ``flag``."""
    if not path:
        raise ConfigError(f"{flag}: the path is empty; give a folder (it is made when missing)")
    _writable(Path(path), flag, path, "a folder (it is made when missing)")
    return Path(path)


def out_file(path: str, flag: str) -> Path:
    """``path`` as a file a command writes (``--plot``, ``--json``), checked before the work: not a folder, and in
    a folder that exists or can be made. Raises ConfigError naming ``flag``."""
    if not path:
        raise ConfigError(f"{flag}: the path is empty; give a file name")
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    _writable(Path(path).parent, flag, path, "a file name in a folder")
    return Path(path)


def _distributed(args) -> None:
    """Join a multi-host run (``jax.distributed.initialize``) when asked, before any device is touched."""
    if args.coordinator or args.num_processes or args.process_id is not None:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


def cmd_run(args) -> int:
    from jaxdfl import config as config_mod
    from jaxdfl import experiment

    _distributed(args)
    if args.resume is not None:
        if not args.resume:
            raise ConfigError("--resume: the path is empty; give the --out folder of an earlier run")
        out = Path(args.resume)
        args.resumable = out
        if not (out / "config.toml").exists():
            raise ConfigError(f"--resume {out}: no config.toml there (give the --out folder of an earlier run)")
        if args.config or args.set or args.seeds is not None or args.out is not None:
            raise ConfigError("--resume takes the run's own config.toml and folder; give no CONFIG, --set, --seeds "
                              "or --out with it")
        cfg = config_mod.load_config(str(out / "config.toml"))
        if not cfg.checkpoint_every:
            raise ConfigError(f"--resume {out}: that run kept no checkpoints (checkpoint_every = 0); run it again "
                              "with checkpoint_every set")
    else:
        if not args.config:
            raise ConfigError("run needs a CONFIG file (or --resume DIR)")
        cfg = _base_config(args)
        out = out_folder(args.out) if args.out is not None else None
    exp = experiment.build(cfg)  # host-side checks first, while the folder still holds the earlier run intact
    for note in config_mod.inert_settings(cfg):
        print(f"note: {note}", file=sys.stderr)
    if out is not None:
        from jaxdfl import results

        if not args.resume:
            clear_outputs(out)
        args.resumable = out  # a Ctrl-C from here on may point at --resume (before, DIR held another run)
        # written before compiling, so that a run killed midway can be resumed from its folder
        results.atomic_write(out / "config.toml", cfg.to_toml())
    bar = ProgressBar() if not args.quiet else None
    ckpt = str(out / "checkpoints") if out is not None and cfg.checkpoint_every else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", config_mod.InertSettingWarning)  # printed as notes above
        result = experiment.run(exp, progress=bar, checkpoint_dir=ckpt, resume=bool(args.resume))
    print(summary_line(result.summary))
    if out is not None:
        write_outputs(out, result)
        print(f"wrote {out}/{{{','.join(RUN_FILES)}}}")
    if result.summary.get("diverged"):
        print(f"jaxdfl: honest models became non-finite by round {result.summary['diverged_round']}; "
              f"metrics up to there are kept", file=sys.stderr)
        return 1
    return 0


def cmd_partition(args) -> int:
    from jaxdfl import data, results

    cfg = _base_config(args)
    for path, flag in ((args.plot, "--plot"), (args.json, "--json")):
        if path is not None:
            out_file(path, flag)
    d = cfg.data
    ds = data.load(d, cfg.topology.n)
    sh = data.partition(ds, cfg.topology.n, d.partition, seed=d.seed, alpha=d.alpha,
                        shards_per_node=d.shards_per_node, quantity_skew=d.quantity_skew,
                        quantity_alpha=d.quantity_alpha)
    report = data.partition_report(sh, ds.num_classes)
    print(data.format_partition_report(report))
    if args.plot is not None:
        data.plot_partition(args.plot, sh, ds.num_classes, title=f"{d.name}, {d.partition}, n={cfg.topology.n}")
        print(f"wrote {args.plot}")
    if args.json is not None:
        results.write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def cmd_topology(args) -> int:
    from jaxdfl import topology

    params = {}
    for item in args.param or []:
        from jaxdfl.config import parse_value

        if "=" not in item:
            raise ConfigError(f"--param {item!r} must look like key=value")
        k, v = item.split("=", 1)
        params[k.strip()] = parse_value(v.strip())
    if args.plot is not None:
        out_file(args.plot, "--plot")
    topo = topology.make(args.kind, args.n, seed=args.seed, weights=args.weights, **params)
    info = topology.describe(topo)
    for k, v in info.items():
        print(f"{k:>24}: {v:.6g}" if isinstance(v, float) else f"{k:>24}: {v}")
    if args.plot is not None:
        byz = None
        if args.attack_config:
            from jaxdfl import byzantine
            from jaxdfl.config import load_config

            att = load_config(args.attack_config, [f"topology.n={args.n}"]).attack
            byz = byzantine.place(args.n, att.byzantine, att.placement, seed=att.seed, degrees=topo.degrees,
                                  ids=list(att.ids))
        topology.plot(topo, args.plot, byzantine=byz)
        print(f"wrote {args.plot}")
    return 0


def _base_config(args):
    from jaxdfl import config as config_mod

    overrides = list(args.set or [])
    if getattr(args, "seeds", None) is not None:
        overrides.append(f"seeds={args.seeds}")
    return config_mod.load_config(args.config, overrides)


def cmd_sweep(args) -> int:
    from jaxdfl import sweep

    grid = sweep.parse_grid(args.grid)
    base = _base_config(args)
    out = out_folder(args.out)
    rows = sweep.run_grid(base, grid, out=out, log=sweep.stderr_log)  # builds every setting before compiling
    print(f"{len(rows)} rows in {args.out}/sweep.csv")
    return 0


def _epsilons(text: str) -> list[float]:
    """``--epsilons 1,4,16`` -> ``[1.0, 4.0, 16.0]``; every item a finite number > 0."""
    eps = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--epsilons {text!r}: {item.strip()!r} is not a number > 0; give finite target "
                              "epsilons separated by commas, e.g. 1,4,16")
        eps.append(value)
    return eps


def _check_search(args) -> None:
    """The privacy study's own options: something to run, and a search range and target that make sense."""
    if args.epsilons is None and args.target_accuracy is None:
        raise ConfigError("privacy needs --epsilons E1,E2,... or --target-accuracy A (or both)")
    if not (math.isfinite(args.lo) and math.isfinite(args.hi) and 0 < args.lo < args.hi):
        raise ConfigError(f"--lo {args.lo:g} --hi {args.hi:g}: the epsilon search range needs 0 < lo < hi")
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise ConfigError(f"--target-accuracy {args.target_accuracy:g}: an accuracy is a fraction in (0, 1], "
                          "e.g. 0.9")


def cmd_privacy(args) -> int:
    from jaxdfl import sweep

    _check_search(args)
    eps = _epsilons(args.epsilons) if args.epsilons is not None else []
    out = out_folder(args.out) if args.out is not None else None
    study = sweep.PrivacyUtility(_base_config(args), log=sweep.stderr_log, out=out)
    if args.target_accuracy is not None:  # the search's two ends built (z calibrated) before anything compiles
        study.check([args.lo, args.hi])
    study.curve(eps)  # builds every target before the first compile
    if args.target_accuracy is not None:
        best = study.smallest_epsilon(args.target_accuracy, lo=args.lo, hi=args.hi)
        print(f"target accuracy not reached at epsilon <= {args.hi}" if best is None else
              f"smallest epsilon reaching accuracy {args.target_accuracy}: {best:.4g}")
    rows = [{"epsilon": e, "accuracy": a} for e, a in sorted(study.cache.items())]
    for r in rows:
        print(f"epsilon {r['epsilon']:10.4g}  accuracy {r['accuracy']:.4f}")
    if out is not None:  # privacy_utility.csv is kept up to date by the study
        study.plot(out / "privacy_utility.png", args.target_accuracy)
        print(f"wrote {out}/privacy_utility.{{csv,png}}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdfl", description="Decentralized federated learning simulator")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    # --debug is accepted after the command too (``jaxdfl run CONFIG --debug``); SUPPRESS keeps a flag given
    # before the command from being reset by the subcommand's default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[common], help="run one experiment from a TOML config")
    p.add_argument("config", nargs="?", help="TOML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. topology.n=64")
    p.add_argument("--out", metavar="DIR",
                   help="write config.toml, metrics.csv, consensus.csv, nodes.csv, summary.json and plots here")
    p.add_argument("--seeds", type=int, metavar="S", help="run S seeds (seed, seed+1, ...) in one program")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", help="multi-host: address:port of process 0 (jax.distributed.initialize)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id")
    p.set_defaults(func=cmd_run)

    w = sub.add_parser("sweep", parents=[common], help="run the cartesian product of settings")
    w.add_argument("config")
    w.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...")
    w.add_argument("--set", action="append", metavar="KEY=VALUE")
    w.add_argument("--seeds", type=int, metavar="S")
    w.add_argument("--out", required=True, metavar="DIR")
    w.set_defaults(func=cmd_sweep)

    v = sub.add_parser("privacy", parents=[common], help="privacy-utility curve: accuracy vs target epsilon")
    v.add_argument("config")
    v.add_argument("--epsilons", metavar="E1,E2,...", help="target epsilons to run")
    v.add_argument("--target-accuracy", type=float, help="also find the smallest epsilon reaching this accuracy")
    v.add_argument("--lo", type=float, default=0.1, help="bisection range for --target-accuracy")
    v.add_argument("--hi", type=float, default=64.0)
    v.add_argument("--set", action="append", metavar="KEY=VALUE")
    v.add_argument("--seeds", type=int, metavar="S")
    v.add_argument("--out", metavar="DIR")
    v.set_defaults(func=cmd_privacy)

    q = sub.add_parser("partition", parents=[common],
                       help="samples per node and label histograms of a config's partition")
    q.add_argument("config")
    q.add_argument("--set", action="append", metavar="KEY=VALUE")
    q.add_argument("--plot", metavar="FILE.png", help="heat-map of label shares per node, with shard sizes")
    q.add_argument("--json", metavar="FILE", help="write the full report")
    q.set_defaults(func=cmd_partition)

    t = sub.add_parser("topology", parents=[common],
                       help="describe a graph: degrees, diameter, spectral gap, consensus rate")
    t.add_argument("kind")
    t.add_argument("--n", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weights", default="metropolis")
    t.add_argument("--param", action="append", metavar="KEY=VALUE", help="family parameter, e.g. degree=4")
    t.add_argument("--plot", metavar="FILE.png", help="draw the graph")
    t.add_argument("--attack-config", metavar="CONFIG", help="highlight the Byzantine nodes this config places")
    t.set_defaults(func=cmd_topology)
    return parser


#: Upper bound of the command's compilation cache; JAX evicts the least recently used programs above it.
COMPILATION_CACHE_BYTES = 1 << 30


def compilation_cache() -> str | None:
    """Keep compiled programs across runs of the command (JAX's persistent compilation cache); returns the folder.

    A rerun of a config, or a sweep's settings in a later process, then skips XLA's compilation (the quickstart
    compiles in about 1 s instead of 6). The folder is ``$XDG_CACHE_HOME/jaxdfl/xla`` (default
    ``~/.cache/jaxdfl/xla``), kept under :data:`COMPILATION_CACHE_BYTES` (JAX's LRU eviction needs the
    ``filelock`` package, a dependency; without it the cache is unbounded). JAX's own settings win:
    ``JAX_COMPILATION_CACHE_DIR`` picks another folder, ``JAX_ENABLE_COMPILATION_CACHE=false`` turns the cache
    off. An uncreatable folder leaves it off.
    """
    import importlib.util

    import jax

    if jax.config.jax_compilation_cache_dir is not None:
        return jax.config.jax_compilation_cache_dir
    if not jax.config.jax_enable_compilation_cache:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "jaxdfl", "xla")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    if jax.config.jax_compilation_cache_max_size < 0 and importlib.util.find_spec("filelock") is not None:
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    return folder


def _interrupted(args) -> str:
    """The line an interrupted command ends with, saying how to continue where that is possible."""
    folder = getattr(args, "resumable", None)  # set by cmd_run once the folder holds only this run's files
    if args.command == "run" and folder and any((Path(folder) / "checkpoints").glob("round_*.npz")):
        return f"jaxdfl: interrupted; continue with: jaxdfl run --resume {folder}"
    folder = getattr(args, "out", None)
    if args.command == "sweep":
        return "jaxdfl: interrupted; the same command continues the sweep (finished settings are skipped)"
    if args.command == "privacy" and folder:
        return "jaxdfl: interrupted; the same command continues the study (finished targets are read back)"
    return "jaxdfl: interrupted"


def main(argv: list[str] | None = None) -> int:
    """The ``jaxdfl`` command; returns its exit status. Errors are one line on stderr (``--debug``: the traceback):
    2 for a config or command-line error, 1 for a file that cannot be read or written (and for a run whose honest
    models diverged), 130 for Ctrl-C. Run as the command (``argv`` None), Ctrl-C ends the process at once after its
    line: interpreter shutdown with a compilation in flight can crash inside XLA."""
    parser = build_parser()
    args = parser.parse_args(argv)
    compilation_cache()
    try:
        return args.func(args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"jaxdfl: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"jaxdfl: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(_interrupted(args), file=sys.stderr)
        if argv is None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
