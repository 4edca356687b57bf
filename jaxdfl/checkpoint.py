"""Checkpoints of the full simulator state (host side): one ``.npz`` per checkpoint, written atomically.

A checkpoint holds every leaf of a pytree (node parameters, optimizer states, the round counter, the rounds key as
raw key data) as ``leaf_00000 ...`` arrays, the metrics so far as ``history/<name>`` arrays, and ``meta`` (JSON:
round, the config).
The accountant needs no state of its own: epsilon is a pure function of the rounds completed, recomputed on load.
Files are named ``round_000040.npz`` under ``DIR/checkpoints/`` (at least six digits: round 1,000,000 is
``round_1000000.npz``; files are ordered by the round number, not by name); a new one is written to a temporary name
and renamed, so a killed run never corrupts the last good checkpoint. The two newest are kept.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import jax
import numpy as np

from jaxdfl.errors import ConfigError
from jaxdfl.results import atomic_write
from jaxdfl.results import remove_temporaries

KEEP = 2

_NAME = re.compile(r"round_(\d+)\.npz")


def _series(directory: str | Path) -> list[Path]:
    """The checkpoint files in ``directory``, oldest first: sorted by round number (as text, round_1000000 would
    come before round_999999), any number of digits."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("round_*.npz") if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def to_host(leaf) -> np.ndarray:
    """A NumPy copy of ``leaf`` (typed keys as their raw key data). An array sharded over devices of other
    processes (a multi-host run) is gathered from all of them first: every process must call this together."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf)


def save(directory: str | Path, round_: int, tree, meta: dict, history: dict | None = None) -> Path:
    """Write ``tree`` (any pytree of arrays, typed keys allowed) and ``history`` (name -> array) as
    ``directory/round_XXXXXX.npz``."""
    directory = Path(directory)
    leaves = jax.tree.leaves(tree)
    buf = io.BytesIO()
    arrays = {f"leaf_{i:05d}": to_host(leaf) for i, leaf in enumerate(leaves)}
    arrays.update({f"history/{k}": to_host(v) for k, v in (history or {}).items()})
    np.savez(buf, meta=np.frombuffer(json.dumps({**meta, "round": round_}).encode(), np.uint8), **arrays)
    path = directory / f"round_{round_:06d}.npz"
    atomic_write(path, buf.getvalue())
    for old in _series(directory)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def clear(directory: str | Path) -> None:
    """Remove the checkpoints in ``directory`` (a fresh run replaces an earlier run's series), and any partial
    checkpoint a killed write left."""
    for old in _series(directory):
        old.unlink(missing_ok=True)
    discard_partial(directory)


def discard_partial(directory: str | Path) -> None:
    """Remove the partial checkpoints (temporary files) that writes killed midway left in ``directory``."""
    remove_temporaries(directory, "round_*.npz")


def config_differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees (as JSON would store them)."""
    stored, current = json.loads(json.dumps(stored)), json.loads(json.dumps(current))
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint file in ``directory``, or None."""
    files = _series(directory)
    return files[-1] if files else None


def load(path: str | Path, template) -> tuple[object, dict, dict]:
    """Read a checkpoint into the structure (and key types) of ``template``. Returns ``(tree, meta, history)``."""
    try:
        with np.load(path) as f:
            meta = json.loads(bytes(f["meta"]).decode())
            stored = [f[name] for name in sorted(n for n in f.files if n.startswith("leaf_"))]
            history = {n.split("/", 1)[1]: f[n] for n in f.files if n.startswith("history/")}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # not written by save: damaged
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); move it away to resume "
                          "from the one before") from None
    leaves, treedef = jax.tree.flatten(template)
    if len(stored) != len(leaves):
        raise ConfigError(f"checkpoint {path} does not match this config ({len(stored)} arrays, "
                          f"expected {len(leaves)})")
    out = []
    for leaf, arr in zip(leaves, stored, strict=True):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            out.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(leaf)))
        else:
            if np.shape(leaf) != arr.shape:
                raise ConfigError(f"checkpoint {path} does not match this config (shape {arr.shape} vs "
                                  f"{np.shape(leaf)})")
            out.append(jax.numpy.asarray(arr, dtype=leaf.dtype))
    return jax.tree.unflatten(treedef, out), meta, history
