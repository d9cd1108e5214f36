"""Components (a head, a neuron, a layer's output at one position, ...) as masks on sites.

A :class:`Component` names a site and fixes some of its axes, e.g.
``Component("attn.z", {"layer": 1, "head": 3})`` is head 3 of layer 1 at every position.
A set of components (a circuit) becomes one mask per site: 1 on every selected entry, 0
elsewhere, size 1 on the axes no component of that site fixes (so it broadcasts there,
the batch axis always among them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from mechinterp.site_io import SiteInfo
from mechinterp.validate import check_index


@dataclasses.dataclass(frozen=True)
class Component:
    """A site with some axes fixed to an index: ``Component("mlp.hidden", {"layer": 0, "d_mlp": 7})``."""

    site: str
    index: Mapping[str, int]

    def __hash__(self):
        return hash((self.site, tuple(sorted(self.index.items()))))

    def __str__(self):
        fixed = ", ".join(f"{axis}={i}" for axis, i in self.index.items())
        return f"{self.site}[{fixed}]"


def component(site: str, **index: int) -> Component:
    """``component("attn.z", layer=1, head=3)``."""
    return Component(site, dict(index))


def _check(component: Component, info: SiteInfo) -> None:
    for axis, i in component.index.items():
        if axis not in (info.axes or ()):
            raise ValueError(
                f"component {component}: {axis!r} is not an axis of site {info.name!r} "
                f"(axes {info.axes})"
            )
        if axis == "batch":
            raise ValueError(f"component {component}: components apply to every example; "
                             "do not fix the batch axis")
        i = check_index(i, f"component {component}: {axis}")
        size = info.shape[info.axes.index(axis)]
        if not 0 <= i < size:
            raise ValueError(
                f"component {component}: {axis}={i} is out of range for site {info.name!r} "
                f"({axis} has size {size})"
            )


def component_masks(
    sites: Mapping[str, SiteInfo], components: Iterable[Component]
) -> dict[str, jnp.ndarray]:
    """One float mask per site touched by ``components`` (see the module docstring)."""
    by_site: dict[str, list[Component]] = {}
    for c in components:
        if c.site not in sites:
            raise KeyError(f"component {c}: unknown site {c.site!r}; sites: {sorted(sites)}")
        _check(c, sites[c.site])
        by_site.setdefault(c.site, []).append(c)
    masks = {}
    for name, members in by_site.items():
        info = sites[name]
        fixed = {axis for c in members for axis in c.index}
        shape = [size if axis in fixed else 1 for axis, size in zip(info.axes, info.shape)]
        mask = np.zeros(shape, np.float32)
        for c in members:
            # an axis this component leaves free is selected whole
            index = tuple(
                c.index[axis] if axis in c.index else slice(None) for axis in info.axes
            )
            mask[index] = 1.0
        masks[name] = jnp.asarray(mask)
    return masks
