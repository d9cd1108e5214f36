"""The family protocol: what an analysis may ask of a model family.

A family is a Flax module whose activations pass through :func:`mechinterp.site`. Beyond
its sites it may implement the capabilities below (plain methods and class attributes,
checked structurally); analyses call :func:`require` and get :class:`MissingCapability`,
naming the capability and the family, where one is absent. Analyses never inspect call
signatures, parameter-tree names or a family's classes. Walk-through:
``docs/adding_a_family.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

Array = Any


@dataclasses.dataclass(frozen=True)
class SublayerSites:
    """One kind of sublayer (``"attn"``, ``"mlp"``, ...) as sites: the residual stream it
    reads (``residual_in``), what it adds back (``output``), and the residual after the add
    (``residual_out``). Its normalized input is ``LinearisableNorms.sublayer_input``."""

    residual_in: str
    output: str
    residual_out: str


@dataclasses.dataclass(frozen=True)
class LayerStructure:
    """A residual network of ``n_layers`` layers. ``residual`` lists the per-layer residual
    sites in forward order (e.g. ``("resid_pre", "resid_mid", "resid_post")``), each with a
    leading layer axis; ``sublayers`` maps each sublayer kind, in forward order, to its
    sites; ``present[kind]`` lists the layers that have that sublayer (all by default)."""

    n_layers: int
    residual: tuple[str, ...]
    sublayers: Mapping[str, SublayerSites]
    present: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def layers_with(self, kind: str) -> tuple[int, ...]:
        if kind not in self.sublayers:
            raise KeyError(f"no sublayer kind {kind!r}; this family has {tuple(self.sublayers)}")
        return self.present.get(kind, tuple(range(self.n_layers)))


class MissingCapability(TypeError, ValueError):
    """A family lacks a capability an analysis needs (a ``TypeError``: the family's type
    lacks it; also a ``ValueError`` for callers that check an analysis's arguments)."""


@runtime_checkable
class HasLayers(Protocol):
    """Layer structure: its layers, residual sites and sublayers."""

    def layer_structure(self) -> LayerStructure: ...


@runtime_checkable
class Resumable(Protocol):
    """Resume protocol: resuming a forward from a cached state (sweep reuse). A patch at
    layer ``l``, position ``p`` leaves layers below ``l`` and (causal models) positions
    before ``p`` unchanged.

    ``resume_state(params, *inputs, **kwargs)`` returns the state (``None`` where these
    inputs cannot resume); ``resume(params, state, first_layer, first_pos)`` returns
    ``(model, params, kwargs)`` with ``model.apply({"params": params}, None, **kwargs)``
    computing the rest. ``first_pos`` is an int; ``first_layer`` may be a traced int32
    scalar (one compilation for every layer; unbatched under ``vmap``). Its per-layer sites
    keep the whole layer axis (layers below ``first_layer`` are skipped, not removed);
    position sites are sliced ``[first_pos:]``, and so are its outputs."""

    def resume_state(self, params, *inputs, **kwargs) -> Any: ...

    def resume(self, params, state, first_layer: Array, first_pos: int
               ) -> tuple[Any, Any, dict[str, Any]]: ...


@runtime_checkable
class SelectsOutputs(Protocol):
    """Output selection: computing only selected outputs (answer logits).
    ``output_selection(positions, columns)`` returns the call keywords that make the forward
    return outputs at ``positions`` (batch, k) only and, when ``columns`` (batch, c) is given
    and ``"columns"`` is in ``selectable_outputs``, only those output columns per example
    (batch, k, c)."""

    selectable_outputs: ClassVar[frozenset[str]]

    def output_selection(self, positions: Array, columns: Array | None = None
                         ) -> dict[str, Array]: ...


@runtime_checkable
class LinearisableNorms(Protocol):
    """Norm linearisation (attribution graphs). ``frozen_norms()`` is a context in which
    every norm's data-dependent scale is a constant for differentiation (forward unchanged,
    so the network is linear in the residual stream around the input);
    ``sublayer_input(params, kind, residual, frozen)`` is the normalized input that
    sublayer ``kind`` computes from its residual stream ``residual`` (layer axis first, then
    any axes, features last), with the scale frozen likewise when ``frozen``."""

    def frozen_norms(self) -> contextlib.AbstractContextManager: ...

    def sublayer_input(self, params, kind: str, residual: Array, frozen: bool = False
                       ) -> Array: ...


@runtime_checkable
class RemovesSublayers(Protocol):
    """Sublayer removal (LLM-Drop). ``remove_sublayers(params, [(kind, layer), ...])``
    returns ``(new_model, new_params)``: a genuinely smaller model without those sublayers
    (and their weights), whose ``layer_structure().present`` lists what is left; a layer
    left with no sublayer is removed and later layers move down. Errors: ``ValueError``."""

    def remove_sublayers(self, params, sublayers: Sequence[tuple[str, int]]
                         ) -> tuple[Any, Any]: ...


@runtime_checkable
class TokenInputs(Protocol):
    """Token inputs: the model reads integer token ids. ``vocab_size`` is the number of
    token ids (valid ids are ``0 .. vocab_size - 1``; also the width of the logits);
    ``token_inputs(*inputs, **kwargs)`` returns ``(tokens, attention_mask)`` of a call
    (either may be ``None``), so :mod:`mechinterp.validate` checks ids and mask shapes at
    every public entry without knowing the family's call signature."""

    vocab_size: int

    def token_inputs(self, *inputs, **kwargs) -> tuple[Array | None, Array | None]: ...



@runtime_checkable
class Unembeds(Protocol):
    """Unembedding through the final norm (direct logit attribution, lenses). The final
    norm must act on the residual stream ``x`` as ``weight * x / scale(x)`` (RMSNorm), so
    that, with the scale held at its value on the full stream, the logits are linear in
    each component of the stream (TransformerLens's ``fold_ln`` convention).

    ``final_norm_scale(params, residual)`` is ``scale(x)`` for ``residual`` (..., d_model):
    the divisor, shape (..., 1) (TransformerLens's ``ln_final.hook_scale``);
    ``unembed_directions(params, token_ids)`` is each token's residual direction (...,
    d_model) with the final norm's weight folded in, so that ``logits[..., t] ==
    (residual / final_norm_scale(params, residual)) @ unembed_directions(params, t)``
    (plus the unembedding bias, if the family has one). A family whose final norm also
    centres the stream (LayerNorm) returns centred directions, which is the same thing."""

    def final_norm_scale(self, params, residual: Array) -> Array: ...

    def unembed_directions(self, params, token_ids: Array) -> Array: ...


CAPABILITIES = (HasLayers, Resumable, SelectsOutputs, LinearisableNorms, RemovesSublayers,
                TokenInputs, Unembeds)


def has(model, capability: type) -> bool:
    """Whether ``model`` implements ``capability`` (one of :data:`CAPABILITIES`)."""
    return isinstance(model, capability)


def require(model, capability: type, needed_by: str) -> Any:
    """``model`` itself if it implements ``capability``, else :class:`MissingCapability`
    naming the capability, the family and the analysis (``needed_by``)."""
    if not has(model, capability):
        what = (capability.__doc__ or "").split(":")[0].split(".")[0].strip()
        what = what[:1].lower() + what[1:]
        raise MissingCapability(
            f"{type(model).__name__} has no {what} (the {capability.__name__} capability of "
            f"mechinterp.family), which {needed_by} needs; see docs/adding_a_family.md")
    return model


def capabilities(model) -> Iterator[str]:
    """The names of the capabilities ``model`` implements."""
    return (c.__name__ for c in CAPABILITIES if has(model, c))
