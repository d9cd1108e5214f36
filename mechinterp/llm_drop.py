"""LLM-Drop: which attention / MLP sublayers or whole blocks a model can lose.

After "What Matters in Transformers? Not All Attention is Needed" (He et al., 2024). A
sublayer's similarity score is ``S = E_tokens[cos(X, Y)]`` between the residual stream
before and after it (importance ``1 - S``); the highest ``S`` is dropped first. Variants
``"attn"``, ``"mlp"``, ``"block"`` and ``"joint"``; ``iterative=True`` rescores after every
drop. Scoring reads the sites ``resid_pre``, ``resid_mid`` and ``resid_post`` and zeroes
already-chosen sublayers with interventions; :func:`drop` removes them for real through the
family's :class:`~mechinterp.family.RemovesSublayers` capability. Details:
``docs/llm_drop.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from mechinterp.site_io import capture, list_sites
from mechinterp.family import HasLayers, RemovesSublayers, require
from mechinterp.interventions import Intervention

KINDS = ("attn", "mlp", "block")
VARIANTS = ("attn", "mlp", "block", "joint")
# The residual stream before and after each kind of sublayer.
SPANS = {"attn": ("resid_pre", "resid_mid"), "mlp": ("resid_mid", "resid_post"),
         "block": ("resid_pre", "resid_post")}


@dataclasses.dataclass(frozen=True, order=True)
class Sublayer:
    """``kind`` ("attn", "mlp" or "block") of layer ``layer``."""

    kind: str
    layer: int

    def __str__(self):
        return f"{self.kind}{self.layer}"


def token_batches(tokens, token_mask=None, batch_size: int = 64):
    """``(tokens, token_mask)`` chunks of at most ``batch_size`` rows, checked non-empty.

    ``token_mask`` (batch, pos) marks the positions that count (default: all)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, pos), got shape {tokens.shape}")
    token_mask = (np.ones(tokens.shape, bool) if token_mask is None
                  else np.asarray(token_mask, bool))
    if token_mask.shape != tokens.shape:
        raise ValueError(f"token_mask has shape {token_mask.shape}, tokens {tokens.shape}")
    if not token_mask.any():
        raise ValueError("the calibration set is empty (no rows, no positions, or an all-zero "
                         "token_mask); pass at least one token")
    return [(tokens[i:i + batch_size], token_mask[i:i + batch_size])
            for i in range(0, tokens.shape[0], batch_size)]


def mlp_out_site(sites) -> str:
    """The MLP output site of a model: ``mlp_out``, or ``moe_out`` for mixture of experts."""
    for name in ("mlp_out", "moe_out"):
        if name in sites:
            return name
    raise ValueError(f"the model records neither mlp_out nor moe_out; sites: {sorted(sites)}")


def zeroing_interventions(sites, sublayers: Iterable[Sublayer]) -> dict[str, Intervention]:
    """Interventions that make ``sublayers`` identities: their ``attn_out`` / MLP output
    zeroed at their layer (a block zeroes both). Both sites always get one (a no-op where
    nothing is dropped), so every set of sublayers runs with one compiled function."""
    n_layers = sites["resid_pre"].shape[0]
    layers = {"attn_out": np.zeros(n_layers, np.float32),
              mlp_out_site(sites): np.zeros(n_layers, np.float32)}
    for s in sublayers:
        if s.kind in ("attn", "block"):
            layers["attn_out"][s.layer] = 1.0
        if s.kind in ("mlp", "block"):
            layers[mlp_out_site(sites)][s.layer] = 1.0
    return {name: Intervention(scale=0.0, add=0.0,
                               mask=jnp.asarray(mask).reshape((-1,) + (1,) * (
                                   len(sites[name].shape) - 1)))
            for name, mask in layers.items()}


def similarity_scores(model, params, tokens, token_mask=None, *, dropped=(),
                      batch_size: int = 64) -> dict[str, np.ndarray]:
    """``{kind: S per layer}`` for ``"attn"``, ``"mlp"`` and ``"block"`` (see the module
    docstring), averaged over the tokens where ``token_mask`` is true. ``dropped``
    sublayers are zeroed first (so their own score is 1)."""
    batches = token_batches(tokens, token_mask, batch_size)
    sums, count = {kind: 0.0 for kind in KINDS}, 0
    for batch, mask in batches:
        sites = list_sites(model, batch)
        interventions = zeroing_interventions(sites, dropped)
        _, acts = capture(model, params, batch, sites=("resid_pre", "resid_mid", "resid_post"),
                          interventions=interventions)
        weight = jnp.asarray(mask, jnp.float32)
        for kind, (before, after) in SPANS.items():
            cos = cosine(acts[before], acts[after])  # (layer, batch, pos)
            sums[kind] = sums[kind] + np.asarray((cos * weight).sum((1, 2)), np.float64)
        count += int(mask.sum())
    return {kind: total / count for kind, total in sums.items()}


def cosine(a, b, eps: float = 1e-12):
    """Cosine similarity over the last axis, in float32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / jnp.maximum(norms, eps)


def candidates(variant: str, n_layers: int) -> list[Sublayer]:
    """Every sublayer a variant may drop, in layer order."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    kinds = ("attn", "mlp") if variant == "joint" else (variant,)
    return [Sublayer(kind, layer) for layer in range(n_layers) for kind in kinds]


def drop_order(model, params, tokens, token_mask=None, *, variant: str, n: int,
               iterative: bool = False, batch_size: int = 64) -> list[tuple[Sublayer, float]]:
    """The ``n`` sublayers ``variant`` drops first, with the score each had when chosen.

    One-shot: the ``n`` highest similarity scores of one scoring pass. Iterative: score,
    drop the highest, rescore with it zeroed, and so on (``n`` passes). Ties go to the
    earlier layer (attention before MLP)."""
    n_layers = list_sites(model, np.asarray(tokens)[:1])["resid_pre"].shape[0]
    pool = candidates(variant, n_layers)
    if not 0 <= n <= len(pool):
        raise ValueError(f"cannot drop n={n} sublayers with variant {variant!r}: the model has "
                         f"{len(pool)} ({n_layers} layers)")
    chosen: list[tuple[Sublayer, float]] = []
    while len(chosen) < n:
        scores = similarity_scores(model, params, tokens, token_mask,
                                   dropped=[s for s, _ in chosen], batch_size=batch_size)
        taken = {s for s, _ in chosen}
        ranked = sorted((s for s in pool if s not in taken),
                        key=lambda s: -scores[s.kind][s.layer])
        step = ranked[:1] if iterative else ranked[:n]
        chosen += [(s, float(scores[s.kind][s.layer])) for s in step]
    return chosen


def drop(model, params, sublayers: Sequence[Sublayer]):
    """``(new_model, new_params)``: ``model`` without ``sublayers``, indexed by the model's
    layers (a ``"block"`` is its attention and its MLP), by the family's sublayer removal
    (:class:`~mechinterp.family.RemovesSublayers`): a genuinely smaller model, a layer left
    with no sublayer removed and later layers moved down."""
    structure = require(model, HasLayers, "llm_drop.drop").layer_structure()
    require(model, RemovesSublayers, "llm_drop.drop")
    n_layers = structure.n_layers
    present = {kind: set(structure.layers_with(kind)) for kind in ("attn", "mlp")}
    parts = []
    for s in sublayers:
        if s.kind not in KINDS or not 0 <= s.layer < n_layers:
            raise ValueError(f"cannot drop {s!r}: kinds are {KINDS}, layers 0..{n_layers - 1}")
        for part in ("attn", "mlp") if s.kind == "block" else (s.kind,):
            if s.layer not in present[part]:
                raise ValueError(f"cannot drop {s}: layer {s.layer} has no {part} sublayer left "
                                 "(listed twice, or already dropped)")
            present[part].discard(s.layer)
            parts.append((part, s.layer))
    if not any(present.values()):
        raise ValueError(f"dropping {len(sublayers)} sublayers leaves no layer; keep at least one")
    return model.remove_sublayers(params, parts)
