"""Result files (host side): atomic writes, metrics.csv, summary.json, plots.

Every file is written to a temporary name in the target folder and renamed into place, so a crash never leaves a
half-written result file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(folder: str | os.PathLike, name: str = "*") -> None:
    """Delete the temporary files that :func:`atomic_write` calls killed mid-write left in ``folder`` for files
    named ``name`` (a glob pattern; ``*``: any). They are never renamed into place, so nothing else removes them."""
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def to_jsonable(x):
    """numpy scalars/arrays -> Python numbers/lists; NaN -> None and +-inf -> "inf" / "-inf" (JSON has neither;
    ``float()`` reads the strings back)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.generic):
        return to_jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json(path, obj) -> None:
    atomic_write(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def history_rows(history: Mapping[str, np.ndarray], seeds=None) -> tuple[list[str], list[list]]:
    """Flatten a history (``[E]`` or ``[S, E]`` per metric) into CSV rows (a ``seed`` column for ``[S, E]``: the
    seed values ``seeds``, or the positions 0..S-1 when not given)."""
    first = np.asarray(history["round"])
    keys = ["round"] + [k for k in history if k != "round" and np.ndim(history[k]) == first.ndim]
    if first.ndim == 1:
        return keys, [[np.asarray(history[k])[e].item() for k in keys] for e in range(first.shape[0])]
    seeds = list(range(first.shape[0])) if seeds is None else list(seeds)
    rows = []
    for s in range(first.shape[0]):
        for e in range(first.shape[1]):
            rows.append([seeds[s]] + [np.asarray(history[k])[s, e].item() for k in keys])
    return ["seed"] + keys, rows


def write_csv(path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def save_figure(path, fig, *, tight_layout: bool = True, dpi: int = 110, **savefig_kwargs) -> None:
    """Render a matplotlib figure to PNG, close it, and write it atomically to ``path``."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    if tight_layout:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi, **savefig_kwargs)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def per_round_consensus(history: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(rounds [R], consensus [R] or [S, R])`` from the per-round series stored with each evaluation."""
    per = np.asarray(history["consensus_per_round"])  # [E, every] or [S, E, every]
    flat = per.reshape(*per.shape[:-2], -1)
    return np.arange(1, flat.shape[-1] + 1), flat


def plot_consensus(path, history: Mapping[str, np.ndarray]) -> None:
    """Consensus distance of the honest nodes vs round (log scale; mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds, cons = per_round_consensus(history)
    if cons.ndim == 2:
        cons = cons.mean(0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(rounds, np.maximum(cons, 1e-30))
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance, mean |x_i - x_mean|^2 (honest)")
    ax.grid(alpha=0.3, which="both")
    save_figure(path, fig)


def plot_accuracy(path, history: Mapping[str, np.ndarray], title: str = "") -> None:
    """Accuracy vs round: honest mean with the min-max band (mean over seeds with their band when seeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = np.asarray(history["round"])
    mean, lo, hi = (np.asarray(history[k]) for k in ("accuracy_mean", "accuracy_min", "accuracy_max"))
    if rounds.ndim == 2:  # seeds: average the curves, band over seeds' mins and maxes
        rounds, mean, lo, hi = rounds[0], mean.mean(0), lo.min(0), hi.max(0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, mean, label="honest mean")
    ax.fill_between(rounds, lo, hi, alpha=0.25, label="min-max over honest nodes")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    save_figure(path, fig)
