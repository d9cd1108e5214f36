"""Direct logit attribution with TransformerLens's semantics and names::

    logits, cache = mi.capture(model, params, tokens, sites=dla_sites(model))
    stack, labels = decompose_resid(model, params, cache, pos_slice=-1, return_labels=True)
    attrs = logit_attrs(model, params, cache, stack, answers, wrong_answers, pos_slice=-1)
    # attrs (component, batch); attrs.sum(0) == the model's logit difference

TL's ``ActivationCache`` methods become functions of ``(model, params, cache)``:
:func:`decompose_resid`, :func:`stack_head_results`, :func:`accumulated_resid`,
:func:`apply_ln_to_stack` (final norm only) and :func:`logit_attrs`; the final norm's
weight is folded into the directions (TL's ``fold_ln``), so components sum exactly to the
logits. Needs the ``HasLayers`` and ``Unembeds`` capabilities. Design notes:
docs/analyses.md ("Direct logit attribution").
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mechinterp.family import HasLayers, Unembeds, require
from mechinterp.site_io import capture

HEAD_SITE = "attn.head_out"


def _structure(model, needed_by: str):
    return require(model, HasLayers, needed_by).layer_structure()


def dla_sites(model, heads: bool = True) -> tuple[str, ...]:
    """The sites the functions here read: the residual stream, every sublayer's output and
    (``heads``) ``attn.head_out``; pass them to :func:`mechinterp.capture`."""
    s = _structure(model, "dla_sites")
    names = list(s.residual) + [sub.output for sub in s.sublayers.values()]
    return tuple(dict.fromkeys(names + ([HEAD_SITE] if heads else [])))


def _get(cache, name: str):
    if name not in cache:
        raise KeyError(f"the cache has no {name!r}: capture it (dla_sites(model) lists every "
                       f"site direct logit attribution reads); the cache has {sorted(cache)}")
    return jnp.asarray(cache[name], jnp.float32)


def _slice(x, pos_slice, axis: int):
    """TransformerLens's ``Slice``: ``None`` keeps every position, an int takes one (the
    axis goes), a slice or an index array selects."""
    if pos_slice is None:
        return x
    if isinstance(pos_slice, (int, np.integer, slice)):
        return x[(slice(None),) * (axis % x.ndim) + (pos_slice,)]
    return jnp.take(x, jnp.asarray(pos_slice) % x.shape[axis], axis=axis)


def _final_layer(s, layer) -> int:
    return s.n_layers if layer is None or layer == -1 else int(layer)


def _ln(model, params, cache, stack, layer, n_layers, pos_slice, needed_by):
    if layer != n_layers:
        raise ValueError(f"{needed_by}(apply_ln=True) applies the final norm only (layer=-1 "
                         f"or {n_layers}), got layer={layer}")
    return apply_ln_to_stack(model, params, cache, stack, pos_slice=pos_slice)


def decompose_resid(model, params, cache, layer: int | None = None, mlp_input: bool = False,
                    mode: str = "all", apply_ln: bool = False, pos_slice=None,
                    incl_embeds: bool = True, return_labels: bool = False):
    """The stream entering ``layer`` (default: the final stream, ``n_layers``) as a stack
    (component, batch, [pos,] d_model): the embedding (``"embed"``), then ``"{l}_attn_out"``
    and ``"{l}_mlp_out"`` of every layer before it (``mode`` ``"attn"`` / ``"mlp"`` keeps
    one kind; ``mlp_input`` adds ``layer``'s attention output). TransformerLens's
    ``cache.decompose_resid``; ``apply_ln`` only for the final stream."""
    s = _structure(model, "decompose_resid")
    layer = _final_layer(s, layer)
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
    if mlp_input and layer >= s.n_layers:
        raise ValueError(f"mlp_input=True needs a layer below {s.n_layers} (the final stream "
                         "has no MLP input)")
    parts, labels = [], []
    if incl_embeds:
        parts.append(_get(cache, s.residual[0])[0])
        labels.append("embed")
    kinds = [k for k in s.sublayers if mode == "all" or k == mode]
    for l in range(layer + (1 if mlp_input else 0)):
        for kind in kinds:
            if l == layer and kind != "attn":
                continue
            if l in s.layers_with(kind):
                parts.append(_get(cache, s.sublayers[kind].output)[l])
                labels.append(f"{l}_{kind}_out")
    stack = jnp.stack([_slice(p, pos_slice, -2) for p in parts])
    if apply_ln:
        stack = _ln(model, params, cache, stack, layer, s.n_layers, pos_slice,
                    "decompose_resid")
    return (stack, labels) if return_labels else stack


def accumulated_resid(model, params, cache, layer: int | None = None, incl_mid: bool = False,
                      apply_ln: bool = False, pos_slice=None, mlp_input: bool = False,
                      return_labels: bool = False):
    """The stream before each layer up to ``layer`` (default: all, then the final stream):
    ``"{l}_pre"`` (``"{l}_mid"`` too with ``incl_mid``), ``"final_post"``; stack (entry,
    batch, [pos,] d_model). ``apply_ln`` (final stream only) normalizes each entry by its
    own final-norm scale: times :func:`unembed directions <mechinterp.family.Unembeds>`, the
    logit lens. TransformerLens's ``cache.accumulated_resid``."""
    s = _structure(model, "accumulated_resid")
    layer = _final_layer(s, layer)
    pre, mids, post = s.residual[0], s.residual[1:-1], s.residual[-1]
    parts, labels = [], []
    for l in range(layer + 1):
        if l == s.n_layers:
            parts.append(_get(cache, post)[-1])
            labels.append("final_post")
            continue
        parts.append(_get(cache, pre)[l])
        labels.append(f"{l}_pre")
        if (incl_mid and l < layer) or (mlp_input and l == layer):
            for mid in mids:
                parts.append(_get(cache, mid)[l])
                labels.append(f"{l}_mid")
    stack = jnp.stack([_slice(p, pos_slice, -2) for p in parts])
    if apply_ln:
        if layer != s.n_layers:
            raise ValueError("accumulated_resid(apply_ln=True) applies the final norm only "
                             f"(layer=-1 or {s.n_layers}), got layer={layer}")
        unembeds = require(model, Unembeds, "accumulated_resid(apply_ln=True)")
        stack = stack / unembeds.final_norm_scale(params, stack)
    return (stack, labels) if return_labels else stack


def stack_head_results(model, params, cache, layer: int | None = None,
                       return_labels: bool = False, incl_remainder: bool = False,
                       pos_slice=None, apply_ln: bool = False):
    """Every head's write to the stream (the ``attn.head_out`` site) in the layers before
    ``layer`` (default: all), stack (layer * head, batch, [pos,] d_model) labelled
    ``"L{l}H{h}"``; ``incl_remainder`` adds ``"remainder"``, the rest of the stream after
    layer ``layer - 1``. TransformerLens's ``cache.stack_head_results``."""
    s = _structure(model, "stack_head_results")
    layer = _final_layer(s, layer)
    heads = _slice(_get(cache, HEAD_SITE)[:layer], pos_slice, -3)  # layer batch [pos] head d
    n_heads = heads.shape[-2]
    stack = jnp.moveaxis(heads, -2, 1).reshape((-1,) + heads.shape[1:-2] + heads.shape[-1:])
    labels = [f"L{l}H{h}" for l in range(layer) for h in range(n_heads)]
    if incl_remainder:
        if layer == 0:
            resid = _get(cache, s.residual[0])[0]
        else:
            resid = _get(cache, s.residual[-1])[layer - 1]
        remainder = _slice(resid, pos_slice, -2) - stack.sum(0)
        stack = jnp.concatenate([stack, remainder[None]])
        labels.append("remainder")
    if apply_ln:
        stack = _ln(model, params, cache, stack, layer, s.n_layers, pos_slice,
                    "stack_head_results")
    return (stack, labels) if return_labels else stack


def apply_ln_to_stack(model, params, cache, residual_stack, layer: int | None = None,
                      pos_slice=None):
    """Each component of ``residual_stack`` (component, batch, [pos,] d_model) divided by the
    final norm's scale of the full final stream (``pos_slice`` as the stack was sliced):
    what it contributes to the final norm's output, the weight left to the directions.
    TransformerLens's ``cache.apply_ln_to_stack(stack, layer=-1, pos_slice=...)``."""
    s = _structure(model, "apply_ln_to_stack")
    if _final_layer(s, layer) != s.n_layers:
        raise ValueError(f"apply_ln_to_stack applies the final norm only (layer=-1 or "
                         f"{s.n_layers}), got layer={layer}")
    unembeds = require(model, Unembeds, "apply_ln_to_stack")
    final = _slice(_get(cache, s.residual[-1])[-1], pos_slice, -2)
    return jnp.asarray(residual_stack, jnp.float32) / unembeds.final_norm_scale(params, final)


def logit_directions(model, params, tokens, incorrect_tokens=None):
    """The residual direction (..., d_model) of ``tokens`` (final norm weight folded in),
    minus that of ``incorrect_tokens``: TransformerLens's ``tokens_to_residual_directions``
    on a ``fold_ln`` model."""
    unembeds = require(model, Unembeds, "logit_directions")
    directions = unembeds.unembed_directions(params, jnp.asarray(tokens))
    if incorrect_tokens is not None:
        if np.shape(tokens) != np.shape(incorrect_tokens):
            raise ValueError(f"tokens and incorrect_tokens must have the same shape, got "
                             f"{np.shape(tokens)} and {np.shape(incorrect_tokens)}")
        directions = directions - unembeds.unembed_directions(params,
                                                              jnp.asarray(incorrect_tokens))
    return directions


def logit_attrs(model, params, cache, residual_stack, tokens, incorrect_tokens=None,
                pos_slice=None):
    """Each component's direct effect on the logit of ``tokens`` (or the logit difference
    ``tokens - incorrect_tokens``): :func:`apply_ln_to_stack`, then the dot product with
    :func:`logit_directions`. ``tokens``: one id, (batch,) (one per example, every kept
    position) or (batch, pos). Returns (component, batch, [pos]). TransformerLens's
    ``cache.logit_attrs``."""
    scaled = apply_ln_to_stack(model, params, cache, residual_stack, pos_slice=pos_slice)
    directions = logit_directions(model, params, tokens, incorrect_tokens)
    if scaled.ndim == 4 and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]:
        directions = directions[:, None]  # per example, over positions
    return (scaled * directions).sum(-1)


@dataclasses.dataclass(frozen=True)
class LogitAttribution:
    """:func:`logit_attribution`'s result (numpy, float32, per example of the batch).

    ``layers`` (component, batch) with ``layer_labels`` (``"embed"``, ``"0_attn_out"``,
    ...); ``heads`` (layer, head, batch); ``accumulated`` (n_layers + 1, batch) with
    ``accumulated_labels``: the logit difference read from the stream before each layer,
    each normalized by its own final-norm scale (the logit lens of the difference);
    ``logit_diff`` (batch,): the model's own, equal to ``layers.sum(0)``."""

    layer_labels: list[str]
    layers: np.ndarray
    heads: np.ndarray
    accumulated_labels: list[str]
    accumulated: np.ndarray
    logit_diff: np.ndarray

    def top_heads(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` heads with the largest mean attribution, as ``("L{l}H{h}", value)``."""
        mean = self.heads.mean(-1)
        order = np.argsort(-mean, axis=None)[:k]
        return [(f"L{l}H{h}", float(mean[l, h]))
                for l, h in zip(*np.unravel_index(order, mean.shape))]


def logit_attribution(model, params, *inputs, tokens, incorrect_tokens=None, pos=-1,
                      heads: bool = True, **kwargs) -> LogitAttribution:
    """One forward of ``inputs`` and the direct logit attribution of the logit of
    ``tokens`` (minus ``incorrect_tokens``), per example, at position ``pos`` (an int:
    pad on the left for batches of different lengths): per layer component, per head and
    accumulated. ``kwargs`` go to the model (e.g. ``attention_mask``)."""
    s = _structure(model, "logit_attribution")
    require(model, Unembeds, "logit_attribution")
    logits, cache = capture(model, params, *inputs, sites=dla_sites(model, heads), **kwargs)
    layers, layer_labels = decompose_resid(model, params, cache, pos_slice=pos,
                                           return_labels=True)
    attrs = lambda stack: np.asarray(logit_attrs(model, params, cache, stack, tokens,  # noqa
                                                 incorrect_tokens, pos_slice=pos))
    head_attrs = np.zeros((s.n_layers, 0, layers.shape[1]), np.float32)
    if heads:
        per_head = attrs(stack_head_results(model, params, cache, pos_slice=pos))
        head_attrs = per_head.reshape(s.n_layers, -1, per_head.shape[-1])
    accumulated, accumulated_labels = accumulated_resid(
        model, params, cache, apply_ln=True, pos_slice=pos, return_labels=True)
    directions = logit_directions(model, params, tokens, incorrect_tokens)
    last = jnp.asarray(logits, jnp.float32)[:, pos]
    ids = jnp.broadcast_to(jnp.asarray(tokens), last.shape[:1])
    diff = jnp.take_along_axis(last, ids[:, None], -1)[:, 0]
    if incorrect_tokens is not None:
        wrong = jnp.broadcast_to(jnp.asarray(incorrect_tokens), last.shape[:1])
        diff = diff - jnp.take_along_axis(last, wrong[:, None], -1)[:, 0]
    return LogitAttribution(
        layer_labels=layer_labels, layers=attrs(layers), heads=head_attrs,
        accumulated_labels=accumulated_labels,
        accumulated=np.asarray((accumulated * directions).sum(-1)),
        logit_diff=np.asarray(diff))
