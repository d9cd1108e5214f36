"""LLM-Drop: which attention / MLP sublayers or whole blocks a decoder can lose.

After "What Matters in Transformers? Not All Attention is Needed" (He et al., 2024). A
pre-norm sublayer maps its residual input ``X`` to ``Y = X + f(norm(X))``; its similarity
score over a calibration set is

    S = E_tokens [ X . Y / (||X|| ||Y||) ]          (importance = 1 - S)

with ``(X, Y)`` = (``resid_pre``, ``resid_mid``) for attention, (``resid_mid``,
``resid_post``) for the MLP and (``resid_pre``, ``resid_post``) for a whole block. A
sublayer with ``S`` near 1 barely changes the stream, so it is dropped first. Variants:
``"attn"`` (attention only), ``"mlp"`` (MLP only), ``"block"`` (whole layers) and
``"joint"`` (attention and MLP sublayers ranked together); ``iterative=True`` rescores after
every drop, one-shot ranks once.

Scoring reads sites, so it works on any decoder whose layers record ``resid_pre``,
``resid_mid`` and ``resid_post`` (ours, or one from ``load_hf``). While a drop order is
built, already-chosen sublayers are zeroed with interventions on ``attn_out`` / ``mlp_out``
(``x + 0`` is exactly the dropped sublayer). :func:`drop` then performs the surgery on a
:class:`~mechinterp.models.Decoder`: it returns a smaller model whose config lists the kept
sublayers (``attn_layers`` / ``mlp_layers``; layers that lose both are removed and the rest
renumbered) and a parameter tree without the dropped weights and their norms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mechinterp.api import capture, list_sites
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
    """``(new_model, new_params)``: ``model`` (a :class:`~mechinterp.models.Decoder`) without
    ``sublayers``, indexed by the model's layers. The new config keeps the kept sublayers in
    ``attn_layers`` / ``mlp_layers``; a layer left with neither is removed and later layers
    move down. Scanned parameters stay scanned when every layer keeps the same sublayers,
    otherwise the result is unrolled (``scan_layers=False``)."""
    from mechinterp.models.decoder import stack_layers, unstack_layers

    c = model.config
    attn = [c.has_attention(i) for i in range(c.n_layers)]
    mlp = [c.has_mlp(i) for i in range(c.n_layers)]
    seen = set()
    for s in sublayers:
        if s.kind not in KINDS or not 0 <= s.layer < c.n_layers:
            raise ValueError(f"cannot drop {s!r}: kinds are {KINDS}, layers 0..{c.n_layers - 1}")
        parts = ("attn", "mlp") if s.kind == "block" else (s.kind,)
        for part in parts:
            present = attn if part == "attn" else mlp
            if (part, s.layer) in seen or not present[s.layer]:
                raise ValueError(f"cannot drop {s}: layer {s.layer} has no {part} sublayer left "
                                 "(listed twice, or already dropped)")
            seen.add((part, s.layer))
            present[s.layer] = False
    kept = [i for i in range(c.n_layers) if attn[i] or mlp[i]]
    if not kept:
        raise ValueError(f"dropping {len(sublayers)} sublayers leaves no layer; keep at least one")
    mlp_name = "moe" if c.n_experts > 0 else "mlp"
    layers = (unstack_layers(params, c.n_layers) if c.scan_layers
              else dict(nn.meta.unbox(params)))
    new_params = {k: v for k, v in layers.items() if not k.startswith("layers_")}
    for new, old in enumerate(kept):
        removed = (set() if attn[old] else {"attn", "attn_norm"}) | (
            set() if mlp[old] else {mlp_name, "mlp_norm"})
        new_params[f"layers_{new}"] = {k: v for k, v in layers[f"layers_{old}"].items()
                                       if k not in removed}
    attn_layers = tuple(j for j, i in enumerate(kept) if attn[i])
    mlp_layers = tuple(j for j, i in enumerate(kept) if mlp[i])
    uniform = all(len(t) in (0, len(kept)) for t in (attn_layers, mlp_layers))
    config = dataclasses.replace(c, n_layers=len(kept), attn_layers=attn_layers,
                                 mlp_layers=mlp_layers, scan_layers=c.scan_layers and uniform)
    if config.scan_layers:
        new_params = stack_layers(new_params)
    return type(model)(config), new_params
