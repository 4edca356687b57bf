"""Gossip over a mixing matrix: the exchange step of D-SGD, dense and sparse (jitted kernels).

Both compute ``X' = W X`` for node vectors ``X: [N, D]``: the dense path as one matrix product with the full
``W: [N, N]``, the sparse path from the padded neighbour table (``neighbors: [N, K]``, ``weights: [N, K]`` with 0 on
padding) as ``X'_i = sum_k weights[i, k] X[neighbors[i, k]]``. The dense path costs O(N^2 D), the sparse one
O(N K D); :func:`choose_path` picks one from the sizes.

The engine applies it after local training (adapt-then-combine: ``x_i <- sum_j W_ij (x_j - lr g_j)``), the form of
Koloskova et al. 2020 and of DFedAvg (Sun et al. 2022); Lian et al.'s D-PSGD instead mixes the round-start models and
adds the gradient taken there.

References: A. Koloskova, N. Loizou, S. Boreiri, M. Jaggi, S. Stich, "A unified theory of decentralized SGD with
changing topology and local updates", ICML 2020; T. Sun, D. Li, B. Wang, "Decentralized federated averaging", IEEE
TPAMI 2022; X. Lian et al., "Can decentralized algorithms outperform centralized algorithms?", NeurIPS 2017.
"""

from __future__ import annotations

import jax.numpy as jnp


def dense(mixing, x):
    """``W @ X``. ``mixing: [N, N]``, ``x: [N, D]`` -> ``[N, D]``."""
    return jnp.matmul(mixing.astype(x.dtype), x, precision="highest")


def gather(x, neighbors):
    """The gathered neighbourhood block ``x[neighbors]``: ``[N, D]``, ``[N, K]`` -> ``[N, K, D]``."""
    return jnp.take(x, neighbors, axis=0)


def sparse(neighbors, weights, x):
    """``X'_i = sum_k weights[i, k] X[neighbors[i, k]]`` without materialising ``[N, K, D]``.

    ``neighbors: [N, K]`` int, ``weights: [N, K]`` (0 on padded entries), ``x: [N, D]`` -> ``[N, D]``.
    """
    w = weights.astype(x.dtype)
    out = w[:, 0, None] * jnp.take(x, neighbors[:, 0], axis=0)
    for k in range(1, neighbors.shape[1]):  # K is small and static: K fused gathers, no [N, K, D] block
        out = out + w[:, k, None] * jnp.take(x, neighbors[:, k], axis=0)
    return out


def choose_path(n: int, k: int, setting: str = "auto") -> str:
    """``"dense"`` or ``"sparse"``: dense when asked, or (auto) when the graph is dense enough (K >= N/4)."""
    if setting != "auto":
        return setting
    return "dense" if 4 * k >= n else "sparse"
