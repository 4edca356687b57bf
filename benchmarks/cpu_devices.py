"""Whole experiments with the node axis split over the CPU's cores as JAX devices, against one CPU device.

By default JAX sees a CPU as one device: XLA:CPU spreads a large matrix multiply over every core, but the many small
operations of a round (each node's batched layers, the rule's fused loops, the gossip) mostly run one after
another. ``JAX_NUM_CPU_DEVICES=c`` (JAX's own setting, read before its first operation; in Python
``jax.config.update("jax_num_cpu_devices", c)`` right after ``import jax``) makes c CPU devices, and jaxdfl's
``parallel.devices = "auto"`` shards the node axis over the most of them that divide N, as it does over GPUs.

For each workload this runs ``jaxdfl.run`` in a fresh process per device count and reports compile and run seconds
(run: the best of ``--reps`` runs, compilation excluded) and the final mean accuracy, which agrees up to float
rounding (a sharded reduction adds in another order).

    python benchmarks/cpu_devices.py [--devices 2] [--reps 2] [--workloads mlp_mean_256,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs/quickstart.toml")

#: name -> (description, overrides of configs/quickstart.toml). ``{npz}`` is a file of random 28x28 images.
WORKLOADS = {
    "mlp_mean_256": ("ring N=256, MLP[64] on digits, gossip, 200 rounds",
                     ["topology.n=256", "rounds=200", "eval_every=200"]),
    "mlp_mean_1024": ("ring N=1024, MLP[64] on digits, gossip, 50 rounds",
                      ["topology.n=1024", "rounds=50", "eval_every=50"]),
    "mlp_median_256": ("ring N=256, MLP[64], coordinate-wise median, 200 rounds",
                       ["topology.n=256", "rounds=200", "eval_every=200", 'aggregation.rule="median"']),
    "mlp_clipped_gossip_256": ("8-regular N=256, MLP[64], clipped gossip, 200 rounds",
                               ["topology.n=256", "rounds=200", "eval_every=200", 'topology.kind="random_regular"',
                                "topology.degree=8", 'aggregation.rule="clipped_gossip"']),
    "mlp_dpsgd_64": ("ring N=64, MLP[64], DP-SGD (z=1, batch 8), 200 rounds",
                     ["topology.n=64", "rounds=200", "eval_every=200", 'privacy.mode="example"',
                      "privacy.noise_multiplier=1.0", "train.batch_size=8"]),
    "lenet5_32": ("ring N=32, LeNet-5 on random 28x28x1 images, batch 32, 10 rounds",
                  ["topology.n=32", "rounds=10", "eval_every=10", 'data.name="npz"', 'data.path="{npz}"',
                   'model.name="lenet5"']),
}


def random_images(path: Path, n: int = 32) -> Path:
    """An npz of random 28x28 uint8 images, 64 per node (the LeNet-5 workload needs no dataset)."""
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, x_train=rng.integers(0, 256, (64 * n, 28, 28), dtype=np.uint8),
                 y_train=rng.integers(0, 10, 64 * n), x_test=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
                 y_test=rng.integers(0, 10, 100))
    return path


def worker(names: list[str], reps: int, npz: str, config: str) -> None:
    """Run the workloads in this process (its device count fixed by the environment); one JSON line each."""
    import jax

    import jaxdfl

    for name in names:
        cfg = jaxdfl.load_config(config, [s.replace("{npz}", npz) for s in WORKLOADS[name][1]])
        runs = [jaxdfl.run(cfg) for _ in range(reps)]
        print(json.dumps({"workload": name, "cpu_devices": jax.device_count(),
                          "node_devices": runs[0].summary["devices"],
                          "compile_s": min(r.summary["compile_seconds"] for r in runs),
                          "run_s": min(r.summary["run_seconds"] for r in runs),
                          "accuracy": runs[-1].summary["final"]["accuracy_mean"]}), flush=True)


def measure(names: list[str], devices: int, reps: int, npz: str, config: str = QUICKSTART) -> list[dict]:
    """Run the workloads in a fresh process with ``JAX_NUM_CPU_DEVICES=devices``."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}
    cmd = [sys.executable, __file__, "--worker", "--workloads", ",".join(names), "--reps", str(reps), "--npz", npz,
           "--config", config]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker with {devices} CPU device(s) failed:\n{out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def table(one: list[dict], many: list[dict]) -> list[str]:
    lines = ["| workload | node devices | compile s (1 / c) | run s (1 / c) | run speed-up | accuracy (1 / c) |",
             "|---|---:|---:|---:|---:|---:|"]
    for a, b in zip(one, many):
        lines.append(f"| {WORKLOADS[a['workload']][0]} | {b['node_devices']} | {a['compile_s']:.1f} / "
                     f"{b['compile_s']:.1f} | {a['run_s']:.2f} / {b['run_s']:.2f} | {a['run_s'] / b['run_s']:.2f}x | "
                     f"{a['accuracy']:.4f} / {b['accuracy']:.4f} |")
    return lines


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=min(os.cpu_count() or 1, 8), help="c: CPU devices to compare "
                    "with one (default: one per core, at most 8)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--config", default=QUICKSTART, help="base config the workloads override")
    ap.add_argument("--json", help="write both measurements here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = args.workloads.split(",")
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        ap.error(f"--workloads: unknown {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    if args.worker:
        worker(names, args.reps, args.npz, args.config)
        return []
    if args.devices < 2:
        ap.error(f"--devices must be at least 2 (it is compared with one device), got {args.devices}")
    load = os.getloadavg()[0]  # at the start, for the table's header
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(random_images(Path(tmp) / "random28.npz"))
        one = measure(names, 1, args.reps, npz, args.config)
        many = measure(names, args.devices, args.reps, npz, args.config)
    import jax

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    lines = [f"# {machine(load)}", f"# one CPU device against JAX_NUM_CPU_DEVICES={args.devices}", *table(one, many)]
    print("\n".join(lines))
    if args.json:
        from jaxdfl.results import atomic_write

        atomic_write(Path(args.json), json.dumps({"jax": jax.__version__, "one": one, "many": many}, indent=1))
    return lines


if __name__ == "__main__":
    main()
