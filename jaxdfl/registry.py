"""Which registered components are jaxdfl's own (host-side).

Rules, attacks, models, graph families and datasets live in plain dicts that users extend or overwrite. What jaxdfl
knows of its own entries (hyper-parameter ranges, neighbourhood sizes, layer types, whether a family is random)
must not be assumed of a user's function registered under a shipped name; a user's function is instead traced once
against its contract before compiling (:func:`traced`, :func:`layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

from jaxdfl.errors import ConfigError


class Shipped:
    """``shipped(name)``: whether ``name`` is still registered to the function jaxdfl registered under it.

    Built from the registries as jaxdfl defines them (a snapshot of their entries); a name absent from all of them,
    or registered to another function since, is a user's.
    """

    def __init__(self, *registries: Mapping):
        self._registries = registries
        self._snapshot = {name: fn for registry in registries for name, fn in registry.items()}

    def __call__(self, name: str) -> bool:
        for registry in self._registries:
            if name in registry:
                return registry[name] is self._snapshot.get(name)
        return False


def traced(contract: str, shapes: str, fn: Callable, *args):
    """``jax.eval_shape(fn, *args)`` for a user's function checked against its ``contract`` (on the host, nothing is
    compiled); a failure to trace is the function's, raised as one ConfigError line naming the contract."""
    try:
        return jax.eval_shape(fn, *args)
    except Exception as err:
        text = str(err).strip()
        what = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
        raise ConfigError(f"{contract}; with {shapes} it raised {what}") from err


def layout(out) -> tuple | None:
    """``((shape, dtype), ...)`` of a tuple or list of arrays, what a contract compares; None for anything else."""
    if isinstance(out, (tuple, list)) and all(hasattr(o, "shape") for o in out):
        return tuple((o.shape, o.dtype) for o in out)
    return None


def shown(out) -> str:
    """The arrays a function returned, as ``float32[8, 650], bool[8]``, for an error message."""
    return ", ".join(f"{o.dtype}{list(o.shape)}" for o in jax.tree.leaves(out))
