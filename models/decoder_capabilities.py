"""The decoder family's state and the family protocol it speaks (:mod:`mechinterp.family`).

:class:`KVCache` (incremental decoding, resumed forwards), :func:`stack_layers` /
:func:`unstack_layers` (scanned and unrolled parameter layouts) and
:class:`DecoderCapabilities`, the mixin that gives :class:`~mechinterp.models.Decoder` every
capability: layer structure, resume, output selection, norm linearisation, sublayer
removal and unembedding through the final norm. Design notes: ``docs/adding_a_family.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mechinterp.family import LayerStructure, SublayerSites
from mechinterp import validate
from mechinterp.validate import check_index

from .decoder_config import DecoderConfig
from .layers import frozen_rms_norms, rms_normalize

Array = jax.Array
SUBLAYER_KINDS = ("attn", "mlp")
# The norm in front of each kind of sublayer, and its parameters in a layer.
_NORMS = {"attn": "attn_norm", "mlp": "mlp_norm"}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    ``k``, ``v``: (layer, batch, max_len, kv_head, d_head), keys already rotated.
    ``index``: the next slot to write (shared by the batch). ``key_mask`` (batch, max_len):
    which slots hold real tokens. ``next_position`` (batch,): the RoPE position of each
    row's next token. Writing past ``max_len`` is not checked inside ``jit``: size the cache
    for the prompt plus every generated token.
    """

    k: Array
    v: Array
    index: Array
    key_mask: Array
    next_position: Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: DecoderConfig, batch: int, max_len: int) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` rows of up to ``max_len`` tokens."""
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.d_head)
    return KVCache(
        k=jnp.zeros(shape, config.dtype),
        v=jnp.zeros(shape, config.dtype),
        index=jnp.zeros((), jnp.int32),
        key_mask=jnp.zeros((batch, max_len), bool),
        next_position=jnp.zeros((batch,), jnp.int32),
    )



def mask_and_positions(shape, attention_mask, positions, start=0):
    """The boolean token mask (all real without ``attention_mask``) and int32 RoPE
    positions: by default each row counts its real tokens from ``start``."""
    mask = (jnp.ones(shape, bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    if positions is None:
        positions = start + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    return mask, jnp.asarray(positions, jnp.int32)


_UNROLLED = re.compile(r"layers_(\d+)")


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled layout (``layers_0``, ``layers_1``, ...) to scanned layout (``layers`` with a
    leading layer axis). Works on any collection tree (params, intermediates, ...);
    boxed (logically partitioned) leaves are unboxed first."""
    params = dict(nn.meta.unbox(params))
    indices = sorted(int(m.group(1)) for k in params if (m := _UNROLLED.fullmatch(k)))
    if not indices or indices != list(range(len(indices))):
        raise ValueError(
            f"stack_layers needs keys layers_0 ... layers_N-1, got {sorted(params)}"
        )
    layers = [params.pop(f"layers_{i}") for i in indices]
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def unstack_layers(params: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    """Scanned layout (``layers`` with a leading layer axis) to unrolled layout
    (``layers_0`` ... ``layers_{n_layers-1}``); the inverse of :func:`stack_layers`."""
    params = dict(nn.meta.unbox(params))
    if "layers" not in params:
        raise ValueError(f"unstack_layers needs a 'layers' entry, got {sorted(params)}")
    layers = params.pop("layers")
    sizes = {a.shape[0] for a in jax.tree.leaves(layers)}
    if sizes != {n_layers}:
        raise ValueError(f"the layer axis has sizes {sorted(sizes)}, expected {n_layers}")
    unrolled = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], layers)
                for i in range(n_layers)}
    return {**params, **unrolled}


def _per_layer(params: Mapping, path: tuple[str, ...], n_layers: int) -> Array:
    """A per-layer parameter of scanned (``layers``) or unrolled (``layers_i``) layers,
    with a leading layer axis."""
    params = nn.meta.unbox(params)

    def get(tree):
        for key in path:
            tree = tree[key]
        return tree
    if "layers" in params:
        return get(params["layers"])
    return jnp.stack([get(params[f"layers_{i}"]) for i in range(n_layers)])


@functools.partial(jax.jit, static_argnums=0)
def _resume_state(model, params, tokens, attention_mask, positions):
    from mechinterp.site_io import capture  # the analysis core reads sites; no cycle

    mask, positions = mask_and_positions(tokens.shape, attention_mask, positions)
    (_, cache), sites = capture(model, params, tokens, mask, positions,
                                cache=init_cache(model.config, *tokens.shape),
                                sites=["resid_pre"])
    return dict(residual=sites["resid_pre"], k=cache.k, v=cache.v, key_mask=mask,
                positions=positions)


class DecoderCapabilities:
    """The family protocol for :class:`~mechinterp.models.Decoder` and
    :class:`~mechinterp.models.MoEDecoder` (needs ``self.config``, a :class:`DecoderConfig`,
    and ``self.MOE``)."""

    config: DecoderConfig
    MOE: ClassVar[bool]

    # ---------------------------------------------------------------- TokenInputs

    @property
    def vocab_size(self) -> int:
        """Valid token ids are ``0 .. vocab_size - 1`` (also the width of the logits)."""
        return self.config.vocab_size

    def token_inputs(self, tokens=None, attention_mask=None, *args, **kwargs):
        """``(tokens, attention_mask)`` of a call (the order of ``Decoder.__call__``)."""
        return tokens, attention_mask

    # ---------------------------------------------------------------- HasLayers

    def layer_structure(self) -> LayerStructure:
        """``resid_pre -> attn -> resid_mid -> mlp (or MoE) -> resid_post`` per layer;
        ``present`` lists the layers that keep each sublayer (dropped models)."""
        c = self.config
        mlp_out = "moe_out" if self.MOE else "mlp_out"
        return LayerStructure(
            n_layers=c.n_layers, residual=("resid_pre", "resid_mid", "resid_post"),
            sublayers={"attn": SublayerSites("resid_pre", "attn_out", "resid_mid"),
                       "mlp": SublayerSites("resid_mid", mlp_out, "resid_post")},
            present={"attn": tuple(i for i in range(c.n_layers) if c.has_attention(i)),
                     "mlp": tuple(i for i in range(c.n_layers) if c.has_mlp(i))})

    # ---------------------------------------------------------------- Resumable
    # A patch at layer l, position p leaves every layer below l, and (causal attention)
    # every position before p at every layer, as they were in the unpatched run.

    def resume_state(self, params, tokens, attention_mask=None, positions=None, **kwargs):
        """What :meth:`resume` needs from one forward of ``tokens``: the residual stream
        entering every layer (layer, batch, pos, d_model), every layer's keys (rotated) and
        values, the key mask and the RoPE positions. ``None`` where these inputs cannot
        resume: other call keywords (``cache``, ``logit_positions``, ...), or a model whose
        layers differ (dropped sublayers), whose sites do not stack into one layer axis."""
        if kwargs or tokens is None or not self.config.uniform_layers:
            return None
        return _resume_state(self, params, tokens, attention_mask, positions)

    def resume(self, params, state, first_layer, first_pos: int):
        """``(model, params, kwargs)`` computing, from layer ``first_layer`` on and for
        positions ``first_pos`` on, what this model computes on the inputs ``state`` came
        from (:meth:`resume_state`): ``model.apply({"params": params}, None, **kwargs)``.

        ``first_layer`` may be traced (one compilation serves every layer): the returned
        model is this one, skipping the layers below ``first_layer`` (``lax.cond``; keep
        it unbatched under ``vmap``, where a batched predicate computes both branches). Its
        per-layer sites keep the whole layer axis; position sites are sliced
        ``[first_pos:]`` on ``pos``/``query_pos`` (``key_pos`` keeps every position), and
        its logits are those of positions ``first_pos ...``.
        """
        c = self.config
        if validate.is_concrete(first_layer) and not 0 <= int(first_layer) < c.n_layers:
            raise ValueError(f"first_layer={first_layer} is not a layer of this "
                             f"{c.n_layers}-layer model")
        length = state["key_mask"].shape[1]
        if not 0 <= first_pos < length:
            raise ValueError(f"first_pos={first_pos} is not a position of these "
                             f"{length}-token inputs")
        first_layer = jnp.asarray(first_layer, jnp.int32)
        prefix = KVCache(
            k=state["k"], v=state["v"], index=jnp.asarray(first_pos, jnp.int32),
            key_mask=state["key_mask"], next_position=state["positions"][:, first_pos],
        )
        residual = jax.lax.dynamic_index_in_dim(state["residual"], first_layer, 0, False)
        kwargs = dict(residual=residual[:, first_pos:],
                      attention_mask=state["key_mask"][:, first_pos:],
                      positions=state["positions"][:, first_pos:], prefix=prefix,
                      first_layer=first_layer)
        return self, params, kwargs

    # ---------------------------------------------------------------- SelectsOutputs

    selectable_outputs: ClassVar[frozenset[str]] = frozenset({"positions", "columns"})

    def output_selection(self, positions, columns=None) -> dict[str, Array]:
        """``logit_positions`` (and ``logit_columns``): logits only where a metric reads."""
        selection = {"logit_positions": positions}
        if columns is not None:
            selection["logit_columns"] = columns
        return selection

    # ---------------------------------------------------------------- LinearisableNorms

    def frozen_norms(self) -> contextlib.AbstractContextManager:
        """A context in which every RMSNorm's ``1 / rms(x)`` is a constant for
        differentiation (:func:`~mechinterp.models.layers.frozen_rms_norms`)."""
        return frozen_rms_norms()

    def sublayer_input(self, params, kind: str, residual: Array, frozen: bool = False
                       ) -> Array:
        """The normalized input of sublayer ``kind`` (``"attn"`` or ``"mlp"``) of every
        layer: ``residual`` (layer, ..., d_model) through that layer's RMSNorm (frozen
        factor with ``frozen``). Every layer must have the sublayer."""
        c = self.config
        if kind not in _NORMS:
            raise ValueError(f"no sublayer kind {kind!r}; this family has {SUBLAYER_KINDS}")
        if self.layer_structure().layers_with(kind) != tuple(range(c.n_layers)):
            raise ValueError(f"sublayer_input({kind!r}) needs every layer to have its {kind} "
                             f"sublayer; this model keeps it in layers "
                             f"{self.layer_structure().layers_with(kind)}")
        weight = _per_layer(params, (_NORMS[kind], "scale"), c.n_layers)  # (layer, d_model)
        weight = weight.reshape(weight.shape[:1] + (1,) * (residual.ndim - 2)
                                + weight.shape[-1:])
        return rms_normalize(residual, weight, c.rms_norm_eps, frozen)

    # ---------------------------------------------------------------- Unembeds

    def final_norm_scale(self, params, residual: Array) -> Array:
        """The final RMSNorm's divisor ``sqrt(mean(residual^2) + eps)`` (..., 1), in float32
        (TransformerLens's ``ln_final.hook_scale``)."""
        h = jnp.asarray(residual, jnp.float32)
        return jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.config.rms_norm_eps)

    def unembed_directions(self, params, token_ids) -> Array:
        """Each token's unembedding column times the final norm's weight (..., d_model),
        float32: ``logits[..., t] = residual / final_norm_scale(residual) . direction(t)``."""
        params = nn.meta.unbox(params)
        ids = jnp.asarray(token_ids)
        columns = (jnp.take(params["embedding"], ids, axis=0) if self.config.tie_embeddings
                   else jnp.moveaxis(jnp.take(params["lm_head"], ids, axis=1), 0, -1))
        return (jnp.asarray(columns, jnp.float32)
                * jnp.asarray(params["norm"]["scale"], jnp.float32))

    # ---------------------------------------------------------------- RemovesSublayers

    def remove_sublayers(self, params, sublayers: Sequence[tuple[str, int]]):
        """``(new_model, new_params)`` without ``sublayers`` (``(kind, layer)`` pairs,
        ``kind`` ``"attn"`` or ``"mlp"``), their weights and their norms. The new config
        lists the kept sublayers in ``attn_layers`` / ``mlp_layers``; a layer left with
        neither is removed and later layers move down. Scanned parameters stay scanned when
        every layer keeps the same sublayers, otherwise the result is unrolled."""
        c = self.config
        present = {"attn": [c.has_attention(i) for i in range(c.n_layers)],
                   "mlp": [c.has_mlp(i) for i in range(c.n_layers)]}
        sublayers = [(str(kind), check_index(layer, f"the layer of ({kind!r}, {layer!r})"))
                     for kind, layer in sublayers]
        for kind, layer in sublayers:
            if kind not in SUBLAYER_KINDS or not 0 <= layer < c.n_layers:
                raise ValueError(f"cannot remove {kind}{layer}: kinds are {SUBLAYER_KINDS}, "
                                 f"layers 0..{c.n_layers - 1}")
            if not present[kind][layer]:
                raise ValueError(f"cannot remove {kind}{layer}: layer {layer} has no {kind} "
                                 "sublayer left (listed twice, or already dropped)")
            present[kind][layer] = False
        attn, mlp = present["attn"], present["mlp"]
        kept = [i for i in range(c.n_layers) if attn[i] or mlp[i]]
        if not kept:
            raise ValueError(f"removing {len(sublayers)} sublayers leaves no layer; keep at "
                             "least one")
        mlp_name = "moe" if self.MOE else "mlp"
        layers = (unstack_layers(params, c.n_layers) if c.scan_layers
                  else dict(nn.meta.unbox(params)))
        new_params = {k: v for k, v in layers.items() if not _UNROLLED.fullmatch(k)}
        for new, old in enumerate(kept):
            removed = (set() if attn[old] else {"attn", _NORMS["attn"]}) | (
                set() if mlp[old] else {mlp_name, _NORMS["mlp"]})
            new_params[f"layers_{new}"] = {k: v for k, v in layers[f"layers_{old}"].items()
                                           if k not in removed}
        attn_layers = tuple(j for j, i in enumerate(kept) if attn[i])
        mlp_layers = tuple(j for j, i in enumerate(kept) if mlp[i])
        uniform = all(len(t) in (0, len(kept)) for t in (attn_layers, mlp_layers))
        config = dataclasses.replace(c, n_layers=len(kept), attn_layers=attn_layers,
                                     mlp_layers=mlp_layers,
                                     scan_layers=c.scan_layers and uniform)
        if config.scan_layers:
            new_params = stack_layers(new_params)
        return type(self)(config), new_params
