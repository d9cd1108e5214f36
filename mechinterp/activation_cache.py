"""The activation cache that :func:`mechinterp.capture` returns: a dict that knows its axes.

``ActivationCache`` is a ``dict`` ``{site name: array}`` (index it, iterate it, save it with
``np.savez(path, **cache)`` as before) that also keeps each site's :class:`SiteSpec` (axis
names and meaning), so notebooks show ``resid_pre (layer, batch, pos, d_model)`` and not a
bare shape (treescope: :mod:`mechinterp.treescope_repr`). It is a JAX pytree whose leaves
are the arrays in sorted key order, like a dict's; its tree structure differs from a plain
dict's, so map two caches together, or a cache with ``dict(cache)``, not a cache with a dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from mechinterp.sites import SiteSpec


class ActivationCache(dict):
    """``{site name: activation}`` plus ``specs``: ``{site name: SiteSpec}`` for the sites
    whose family declares them (axes and a one-line meaning)."""

    def __init__(self, activations: Mapping = (), specs: Mapping[str, SiteSpec] | None = None):
        super().__init__(activations)
        specs = specs or {}
        self.specs = {name: specs[name] for name in self if name in specs}

    def axes(self, name: str) -> tuple[str, ...] | None:
        """The axis names of ``name``'s activation, or None where unknown or where the
        array no longer has that many axes (e.g. after indexing the cache's arrays)."""
        spec = self.specs.get(name)
        if spec is None or len(spec.axes) != getattr(self[name], "ndim", -1):
            return None
        return spec.axes

    def __repr__(self) -> str:
        return f"ActivationCache({dict.__repr__(self)})"

    def __treescope_repr__(self, path, subtree_renderer):
        from mechinterp import treescope_repr

        return treescope_repr.activation_cache(self, path, subtree_renderer)


def _flatten(cache: ActivationCache):
    names = tuple(sorted(cache))
    return [cache[name] for name in names], (names, tuple(cache.specs.get(n) for n in names))


def _flatten_with_keys(cache: ActivationCache):
    leaves, aux = _flatten(cache)
    return [(jax.tree_util.DictKey(name), leaf) for name, leaf in zip(aux[0], leaves)], aux


def _unflatten(aux, leaves) -> ActivationCache:
    names, specs = aux
    return ActivationCache(dict(zip(names, leaves)),
                           {n: s for n, s in zip(names, specs) if s is not None})


jax.tree_util.register_pytree_with_keys(ActivationCache, _flatten_with_keys, _unflatten,
                                        flatten_func=_flatten)
