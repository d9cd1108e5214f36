"""The one intervention formula every site understands.

An intervention is an affine, masked edit of an activation ``x``::

    x' = x + mask * ((scale - 1) * x + add)

which covers patching (scale 0, add v), zero ablation (scale 0, add 0), mean ablation
(scale 0, add mean), scaling (scale s, add 0) and steering (scale 1, add v). ``mask`` is a
float: ``jax.grad`` of a metric with respect to it at 0 is attribution patching.

Every field broadcasts (numpy rules, aligned on the right) to the site's full shape, which
for a per-layer site starts with the layer axis. ``mask`` of zeros is an exact no-op.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp

Array = Any


@flax.struct.dataclass
class Intervention:
    """``x' = x + mask * ((scale - 1) * x + add)`` at one site.

    Fields are arrays (or Python floats) that broadcast to the site's shape. Build them with
    the constructors (:meth:`patch`, :meth:`zero`, :meth:`mean`, :meth:`scale_by`,
    :meth:`steer`) or directly. Being a pytree, a stack of interventions is one
    ``Intervention`` whose fields carry a leading batch axis, ready for ``jax.vmap``.
    """

    scale: Array = 1.0
    add: Array = 0.0
    mask: Array = 1.0

    @classmethod
    def patch(cls, value: Array, mask: Array = 1.0) -> "Intervention":
        """Replace the activation by ``value`` where ``mask`` is 1."""
        return cls(scale=0.0, add=value, mask=mask)

    @classmethod
    def zero(cls, mask: Array = 1.0) -> "Intervention":
        """Zero ablation."""
        return cls(scale=0.0, add=0.0, mask=mask)

    @classmethod
    def mean(cls, mean_value: Array, mask: Array = 1.0) -> "Intervention":
        """Mean ablation: replace by a mean computed over a reference dataset."""
        return cls(scale=0.0, add=mean_value, mask=mask)

    @classmethod
    def scale_by(cls, factor: Array, mask: Array = 1.0) -> "Intervention":
        """Multiply the activation by ``factor``."""
        return cls(scale=factor, add=0.0, mask=mask)

    @classmethod
    def steer(cls, vector: Array, mask: Array = 1.0) -> "Intervention":
        """Add ``vector`` to the activation (activation steering)."""
        return cls(scale=1.0, add=vector, mask=mask)

    @classmethod
    def noop(cls) -> "Intervention":
        """An intervention that changes nothing (mask 0); outputs stay bit-identical."""
        return cls(scale=1.0, add=0.0, mask=0.0)

    def apply(self, x: Array) -> Array:
        """The edited activation, computed in ``x``'s dtype."""
        dtype = x.dtype
        scale = jnp.asarray(self.scale, dtype)
        add = jnp.asarray(self.add, dtype)
        mask = jnp.asarray(self.mask, dtype)
        return x + mask * ((scale - 1) * x + add)

    def fields(self) -> dict[str, Array]:
        return {"scale": self.scale, "add": self.add, "mask": self.mask}

    def __treescope_repr__(self, path, subtree_renderer):
        from mechinterp import treescope_repr

        return treescope_repr.intervention(self, path, subtree_renderer)
