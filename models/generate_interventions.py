"""Interventions during generation: one set of interventions, given for the prompt, applied
consistently to the cached prefill, every decode step and a full no-cache forward.

The user gives ``{site: Intervention}`` shaped as for ``mechinterp.intervene`` on the
prompt (``tokens``, ``attention_mask``). Along a site's position axes (``pos``,
``query_pos``, ``key_pos``) a field of size 1 broadcasts: the edit applies at *every*
position, generated ones included (a steering vector, a head ablation). A field sized to
the prompt length indexes prompt positions: the edit applies there only and is a no-op
(mask 0) at every generated position (a patch from a clean run). docs/decisions.md
("Generation with interventions") records why.

:func:`extend` pads every position-indexed field to the whole sequence (prompt plus the
tokens generated and fed back); :func:`at` cuts the slice one forward sees: positions
``start ... start + length - 1`` of the sequence, keys ``0 ... key_len - 1`` (the cache's
slots, or the sequence so far without a cache).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.interventions import Intervention
from mechinterp.site_io import intervention_variables, list_sites

QUERY_AXES = ("pos", "query_pos")
KEY_AXES = ("key_pos",)
_PAD = {"scale": 1.0, "add": 0.0, "mask": 0.0}  # a padded entry is a no-op (mask 0)

# Per site: (name, ((axis, kind), ...)) with kind "query" or "key": the position axes the
# site's fields index (size > 1). Static (hashable), so it can be a jit static argument.
Layout = tuple[tuple[str, tuple[tuple[int, str], ...]], ...]


def extend(model, tokens, attention_mask, interventions: Mapping[str, Intervention],
           total_len: int) -> tuple[dict[str, Intervention], Layout]:
    """Check ``interventions`` against the prompt forward (the core's errors: unknown site,
    wrong shape or dtype) and pad their position-indexed fields to ``total_len``."""
    if not interventions:
        return {}, ()
    intervention_variables(model, tokens, attention_mask, interventions=interventions)
    infos = list_sites(model, tokens, attention_mask)
    length = tokens.shape[1]
    extended, layout = {}, []
    for name, intervention in interventions.items():
        info = infos[name]
        if info.axes is None:
            raise ValueError(f"site {name!r} declares no axes ({type(model).__name__}.SITES), "
                             "so generate cannot tell its position axes")
        fields = {}
        for field, value in intervention.fields().items():
            value = jnp.asarray(value, info.dtype if field == "add" else None)
            fields[field] = value.reshape((1,) * (len(info.shape) - value.ndim) + value.shape)
        indexed = tuple(
            (axis, "query" if kind in QUERY_AXES else "key")
            for axis, kind in enumerate(info.axes)
            if kind in QUERY_AXES + KEY_AXES
            and any(v.shape[axis] != 1 for v in fields.values()))
        for axis, kind in enumerate(info.axes):
            if (kind in KEY_AXES and (axis, "key") not in indexed
                    and np.any(np.asarray(fields["add"]) != 0)):
                raise ValueError(
                    f"an intervention adding to {name!r} for every key position would add to "
                    "the empty cache slots of later tokens too; during generation give its "
                    f"fields the prompt's key_pos axis ({length}) explicitly")
        for axis, _ in indexed:
            for field, value in fields.items():
                shape = value.shape[:axis] + (length,) + value.shape[axis + 1:]
                widths = [(0, 0)] * value.ndim
                widths[axis] = (0, total_len - length)
                fields[field] = jnp.pad(jnp.broadcast_to(value, shape), widths,
                                        constant_values=_PAD[field])
        extended[name] = Intervention(**fields)
        layout.append((name, indexed))
    return extended, tuple(layout)


def at(extended: Mapping[str, Intervention], layout: Layout, start, length: int,
       key_len: int) -> dict[str, Intervention]:
    """The interventions one forward sees: sequence positions ``[start, start + length)``
    (``start`` may be traced) and key positions ``[0, key_len)``."""
    out = {}
    for name, indexed in layout:
        fields = extended[name].fields()
        for axis, kind in indexed:
            for field, value in fields.items():
                if kind == "query":
                    value = jax.lax.dynamic_slice_in_dim(value, start, length, axis=axis)
                else:
                    value = jax.lax.slice_in_dim(value, 0, key_len, axis=axis)
                fields[field] = value
        out[name] = Intervention(**fields)
    return out
