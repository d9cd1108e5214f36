"""treescope renderings of activation caches, sites, sweep results and interventions.

Each class calls into here from its ``__treescope_repr__`` (treescope's extension hook), so
``treescope.render_to_html(obj)``, ``treescope.display(obj)`` and notebooks set up with
``treescope.basic_interactive_setup()`` show: a cache's arrays with each site's axis names
and meaning; a site's shape as ``float32[layer=2, pos=5, ...]``; an intervention's kind
(zero ablation, patch, steering, ...) and how much of the site its mask covers; a sweep's
axes and value range above its labelled heatmap (:func:`mechinterp.display.heatmap_html`,
in an iframe as treescope embeds HTML). Lists and dicts of these use the same hooks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from treescope import repr_lib
from treescope import rendering_parts as parts

from mechinterp.display import heatmap_html


def _comment(text: str):
    return parts.comment_color(parts.text(f"  # {text}"))


def _with_comment(rendering, text: str):
    return parts.siblings_with_annotations(rendering, extra_annotations=[_comment(text)])


def shape_text(dtype, shape, axes) -> str:
    """``float32[layer=2, pos=5]`` (axis names where known and fitting, else
    ``float32[2, 5]``)."""
    named = axes is not None and len(axes) == len(shape)
    sizes = [f"{a}={n}" for a, n in zip(axes, shape)] if named else [str(n) for n in shape]
    return f"{np.dtype(dtype).name}[{', '.join(sizes)}]"


def activation_cache(cache, path, subtree_renderer):
    """``ActivationCache({'resid_pre': <array>,  # float32[layer=2, ...]: meaning ...})``."""
    children = []
    for name, value in cache.items():
        child_path = None if path is None else f"{path}[{name!r}]"
        line = parts.siblings_with_annotations(
            subtree_renderer(name), ": ", subtree_renderer(value, path=child_path), ",")
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            spec = cache.specs.get(name)
            note = shape_text(value.dtype, value.shape, cache.axes(name))
            line = _with_comment(line, f"{note}: {spec.meaning}" if spec else note)
        children.append(line)
    return parts.build_foldable_tree_node_from_children(
        prefix=parts.siblings(parts.maybe_qualified_type_name(type(cache)), "({"),
        children=children, suffix="})", path=path,
        child_type_single_and_plural=("site", "sites"))


def site_info(info, path, subtree_renderer):
    """The SiteInfo's fields, annotated with its shape by axis name and its meaning."""
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    rendering = repr_lib.render_object_constructor(type(info), fields, path, subtree_renderer)
    note = shape_text(info.dtype, info.shape, info.axes)
    if info.meaning:
        note += f": {info.meaning}"
    if info.missing_layers:
        note += f" (missing in layers {list(info.missing_layers)})"
    return _with_comment(rendering, note)


def _equals(value, number: float) -> bool:
    return bool(np.all(np.asarray(value) == number))


def intervention_kind(iv) -> str:
    """What ``x' = x + mask * ((scale - 1) * x + add)`` does with these fields."""
    if _equals(iv.mask, 0):
        return "no-op (mask 0)"
    if _equals(iv.scale, 0):
        return "zero ablation" if _equals(iv.add, 0) else "patch (replace by `add`)"
    if _equals(iv.scale, 1):
        return "no-op (scale 1, add 0)" if _equals(iv.add, 0) else "steering (add `add`)"
    if _equals(iv.add, 0):
        return "scaling (by `scale`)"
    return "affine: x + mask * ((scale - 1) * x + add)"


def intervention(iv, path, subtree_renderer):
    """The fields, annotated with the intervention's kind and its mask's coverage."""
    rendering = repr_lib.render_object_constructor(type(iv), iv.fields(), path,
                                                   subtree_renderer)
    mask = np.asarray(iv.mask)
    note = intervention_kind(iv)
    if mask.ndim:
        note += f"; mask on {int(np.count_nonzero(mask))} of {mask.size} entries {mask.shape}"
    return _with_comment(rendering, note)


def sweep_result(result, path, subtree_renderer):
    """The grid's size and value range, its labelled heatmap, then its fields."""
    values = np.asarray(result.values, dtype=np.float64)
    size = " x ".join(f"{a}={n}" for a, n in zip(result.axes, values.shape))
    finite = values[np.isfinite(values)]
    span = (f"values in [{finite.min():.4g}, {finite.max():.4g}]" if finite.size
            else "no finite values")
    heatmap = parts.embedded_iframe(
        heatmap_html(values, result.axes, result.labels),
        fallback_in_text_mode=parts.abbreviation_color(parts.text("# heatmap: HTML only")),
        virtual_height=min(40, values.shape[-2] + 4 if values.ndim > 1 else 5))
    children = [heatmap, *parts.build_field_children(result, path, subtree_renderer,
                                                     ["axes", "labels", "values", "cost"])]
    return parts.build_foldable_tree_node_from_children(
        prefix=parts.siblings(parts.maybe_qualified_type_name(type(result)), "("),
        children=children, suffix=")", path=path,
        first_line_annotation=_comment(f"{size}; {span}"))
