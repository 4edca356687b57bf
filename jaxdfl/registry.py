"""Which registered components are jaxdfl's own (host-side).

Rules, attacks, models, graph families and datasets live in plain dicts that users extend or overwrite. What jaxdfl
knows of its own entries (hyper-parameter ranges, neighbourhood sizes, layer types, whether a family is random)
must not be assumed of a user's function registered under a shipped name.
"""

from __future__ import annotations

from collections.abc import Mapping


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
