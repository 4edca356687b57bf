"""Placement of Byzantine nodes in the graph (host side, before compilation)."""
from __future__ import annotations

import numbers

import numpy as np

from jaxdfl.errors import ConfigError

__all__ = ["PLACEMENTS", "place"]

PLACEMENTS = ("random", "degree", "ids")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def place(n: int, count: int, placement: str = "random", seed: int = 0, degrees=None, ids=None) -> np.ndarray:
    """Choose which nodes are Byzantine.

    Definition: "random": `count` distinct nodes drawn uniformly by ``np.random.default_rng(seed)``; "degree": the
    `count` nodes of highest degree, ties broken by the smaller node id (the strongest placement for an attacker
    that wants to reach many receivers); "ids": exactly the given node ids. Byzantine nodes must stay a strict
    minority of the graph (2 * count < n), otherwise no rule can be expected to hold.

    Args:
        n: number of nodes N (>= 1).
        count: number of Byzantine nodes (config key ``attack.byzantine``).
        placement: "random", "degree" or "ids" (``attack.placement``).
        seed: seed of the random placement.
        degrees: [N] node degrees, required by "degree".
        ids: node ids for "ids" (``attack.ids``); len(ids) must equal count.

    Returns:
        [N] bool mask, True for Byzantine nodes.

    Raises:
        ConfigError: naming ``attack.byzantine``, ``attack.placement`` or ``attack.ids``.
    """
    if not _is_int(n) or n < 1:
        raise ConfigError(f"topology.n: must be an integer >= 1, got {n!r}")
    if not _is_int(count) or count < 0:
        raise ConfigError(f"attack.byzantine: must be an integer >= 0, got {count!r}")
    if 2 * count >= n:
        raise ConfigError(
            f"attack.byzantine: {count} Byzantine nodes out of {n} is not a strict minority; allowed: 0..{(n - 1) // 2}"
        )
    if placement not in PLACEMENTS:
        raise ConfigError(f"attack.placement: must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement != "ids" and ids is not None and len(ids) > 0:
        raise ConfigError(f"attack.ids: only used with attack.placement = 'ids' (placement is {placement!r})")

    mask = np.zeros(n, dtype=bool)
    if placement == "random":
        if not _is_int(seed):
            raise ConfigError(f"attack.seed: must be an integer, got {seed!r}")
        rng = np.random.default_rng(seed)
        mask[rng.choice(n, size=count, replace=False)] = True
    elif placement == "degree":
        if degrees is None:
            raise ConfigError("attack.placement: 'degree' needs the node degrees of the graph")
        deg = np.asarray(degrees)
        if deg.shape != (n,):
            raise ConfigError(f"attack.placement: 'degree' needs {n} node degrees, got shape {deg.shape}")
        # lexsort sorts by the last key first: degree descending, then id ascending.
        order = np.lexsort((np.arange(n), -deg))
        mask[order[:count]] = True
    else:
        if ids is None:
            raise ConfigError("attack.ids: placement 'ids' needs a list of node ids")
        ids = list(ids)
        if not all(_is_int(i) for i in ids):
            raise ConfigError(f"attack.ids: must be integer node ids, got {ids!r}")
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ConfigError(f"attack.ids: node ids must be in [0, {n}), got {bad}")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"attack.ids: duplicate node ids in {ids}")
        if len(ids) != count:
            raise ConfigError(f"attack.ids: {len(ids)} ids given but attack.byzantine = {count}")
        mask[np.asarray(ids, dtype=np.int64)] = True
    return mask
