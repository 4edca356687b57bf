"""Plain NumPy (float64) references of every rule and deterministic pre-aggregator, written from the definitions.

One node at a time, no tricks: explicit sorts, explicit pairwise differences, iterations in the full D-dimensional
space. They are the test oracles for the JAX kernels and the per-node "peer-style" baseline of the benchmark; they
are not meant to be fast. Same signatures as the JAX rules, on NumPy arrays: ``rule(x [K, D], mask [K],
weights [K], **hyper) -> [D]``.
"""

from __future__ import annotations

import numpy as np


def _valid(x, mask):
    return np.asarray(x, np.float64)[np.asarray(mask, bool)]


def mean(x, mask, weights=None):
    v = _valid(x, mask)
    w = np.ones(len(v)) if weights is None else np.asarray(weights, np.float64)[np.asarray(mask, bool)]
    return (w[:, None] * v).sum(0) / w.sum()


def median(x, mask, weights=None):
    return np.median(_valid(x, mask), axis=0)


def trimmed_mean(x, mask, weights=None, *, f=1):
    s = np.sort(_valid(x, mask), axis=0)
    return s[f:len(s) - f].mean(0)


def meamed(x, mask, weights=None, *, f=1):
    v = np.sort(_valid(x, mask), axis=0)  # sorted first, so that the stable argsort keeps the lower of tied values
    med = np.median(v, axis=0)
    nearest = np.argsort(np.abs(v - med), axis=0, kind="stable")[:len(v) - f]
    return np.take_along_axis(v, nearest, axis=0).mean(0)


def _pairwise_sq(v):
    return ((v[:, None, :] - v[None, :, :]) ** 2).sum(-1)


def krum_scores(v, f, all_when_degenerate=False):
    n = len(v)
    d2 = _pairwise_sq(v)
    closest = n - f - 2
    if all_when_degenerate and closest < 1:
        closest = n - 1
    closest = max(closest, 0)
    return np.array([np.sort(np.delete(d2[i], i))[:closest].sum() for i in range(n)])


def krum(x, mask, weights=None, *, f=1):
    v = _valid(x, mask)
    return v[int(np.argmin(krum_scores(v, f)))]


def multi_krum(x, mask, weights=None, *, f=1, m=0):
    v = _valid(x, mask)
    m = m if m > 0 else len(v) - f
    best = np.argsort(krum_scores(v, f), kind="stable")[:m]
    return v[best].mean(0)


def bulyan(x, mask, weights=None, *, f=1):
    v = _valid(x, mask)
    remaining = list(range(len(v)))
    selected = []
    for _ in range(len(v) - 2 * f):
        r = v[remaining]
        scores = krum_scores(r, f, all_when_degenerate=True)
        best = remaining[int(np.argmin(scores))]
        selected.append(best)
        remaining.remove(best)
    s = v[sorted(selected)]
    return meamed(s, np.ones(len(s), bool), f=2 * f)


def geometric_median(x, mask, weights=None, *, nu=0.1, iters=2000, tol=0.0):
    v = _valid(x, mask)
    z = v[0].copy()
    for _ in range(iters):
        b = 1.0 / np.maximum(np.linalg.norm(v - z, axis=1), nu)
        z_new = (b[:, None] * v).sum(0) / b.sum()
        if np.linalg.norm(z_new - z) <= tol * max(np.linalg.norm(z), 1.0):
            return z_new
        z = z_new
    return z


def _clip(v, tau):
    norm = np.linalg.norm(v)
    return v if norm <= tau else v * (tau / norm)


def centered_clip(x, mask, weights=None, *, tau=1.0, iters=3):
    v = _valid(x, mask)
    c = v[0].copy()
    for _ in range(iters):
        c = c + np.mean([_clip(vi - c, tau) for vi in v], axis=0)
    return c


def monna(x, mask, weights=None, *, f=1):
    v = _valid(x, mask)
    dist = np.linalg.norm(v - v[0], axis=1)
    return v[np.argsort(dist, kind="stable")[:len(v) - f]].mean(0)


def clipped_gossip(x, mask, weights, *, tau=1.0, adaptive=False, f=1):
    mask = np.asarray(mask, bool)
    x = np.asarray(x, np.float64)
    w = np.asarray(weights, np.float64)
    nbrs = [k for k in range(1, len(mask)) if mask[k]]
    if adaptive:
        dist = sorted(np.linalg.norm(x[k] - x[0]) for k in nbrs)
        tau = dist[len(nbrs) - f - 1] if len(nbrs) > f else 0.0
    return x[0] + sum(w[k] * _clip(x[k] - x[0], tau) for k in nbrs)


def ios(x, mask, weights, *, f=1):
    mask = np.asarray(mask, bool)
    x = np.asarray(x, np.float64)
    w = np.asarray(weights, np.float64)
    active = [k for k in range(len(mask)) if mask[k]]

    def wmean(idx):
        return sum(w[k] * x[k] for k in idx) / sum(w[k] for k in idx)

    for _ in range(f):
        z = wmean(active)
        cands = [k for k in active if k != 0]
        if not cands:
            break
        far = max(cands, key=lambda k: (np.linalg.norm(x[k] - z), -k))
        active.remove(far)
    return wmean(active)


def nnm(x, mask, weights, *, f=1):
    """Pre-aggregator reference: returns the mixed valid rows ``[n, D]`` (masked rows dropped)."""
    v = _valid(x, mask)
    d2 = _pairwise_sq(v)
    return np.stack([v[np.argsort(d2[i], kind="stable")[:len(v) - f]].mean(0) for i in range(len(v))])


def clip(x, mask, weights, *, tau=1.0, self_centered=False):
    """Pre-aggregator reference: returns the clipped valid rows ``[n, D]``."""
    v = _valid(x, mask)
    c = v[0] if self_centered else np.zeros(v.shape[1])
    return np.stack([c + _clip(vi - c, tau) for vi in v])


REGISTRY = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "bulyan": bulyan,
    "geometric_median": geometric_median,
    "centered_clip": centered_clip,
    "meamed": meamed,
    "monna": monna,
    "clipped_gossip": clipped_gossip,
    "ios": ios,
}
