"""How a decoder uses its depth: contributions, layer skipping, logit lens, residual maps.

After "Do Language Models Use Their Depth Efficiently?" (Csordás, Manning and Potts,
2025), on the pre-norm residual ``h_{l+1} = h_l + a_l + m_l`` (``resid_pre``,
``attn_out``, ``mlp_out``); e.g. relative contribution ``||a_l + m_l|| / ||h_l||``.

Key names: :func:`layer_contributions` (norm ratios and cosines), :func:`skip_effects`
(zero a layer; change of later contributions, ``KL(p || p_skip)``, top-1 agreement),
:func:`logit_lens` (``KL(p_final || p_l)``, top-k overlap; :func:`logit_lens_top_k`
the tokens themselves), :func:`residual_map_r2`
(ridge maps between two models' streams, held-out ``R^2``). Everything reads or edits
sites, so it works on any decoder with them. Unlike the paper (a maximum over
positions), the skip measure is a mean over positions.

Design notes: docs/analyses.md ("Depth efficiency").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.site_io import capture, intervene, list_sites
from mechinterp.interventions import Intervention
from mechinterp.llm_drop import cosine, mlp_out_site, token_batches


def _masked_mean_device(values, mask) -> jax.Array:
    """Mean of ``values`` (..., batch, pos) over the positions where ``mask`` is true."""
    weight = jnp.asarray(mask, jnp.float32)
    return (values * weight).sum((-2, -1)) / weight.sum()


def _masked_mean(values, mask) -> np.ndarray:
    """:func:`_masked_mean_device` on the host, float64."""
    return np.asarray(_masked_mean_device(values, mask), np.float64)


def layer_contributions(model, params, tokens, token_mask=None, batch_size: int = 64):
    """Per-layer relative norms and cosines (see the module docstring), each an array of
    length ``n_layers``: ``rel_layer``, ``rel_attn``, ``rel_mlp``, ``cos_layer``,
    ``cos_attn``, ``cos_mlp``."""
    totals, count = {}, 0
    for batch, mask in token_batches(tokens, token_mask, batch_size):
        mlp = mlp_out_site(list_sites(model, batch))
        _, acts = capture(model, params, batch, sites=("resid_pre", "attn_out", mlp))
        h = acts["resid_pre"].astype(jnp.float32)
        parts = {"attn": acts["attn_out"].astype(jnp.float32),
                 "mlp": acts[mlp].astype(jnp.float32)}
        parts["layer"] = parts["attn"] + parts["mlp"]
        h_norm = jnp.maximum(jnp.linalg.norm(h, axis=-1), 1e-12)
        n = int(mask.sum())
        for name, out in parts.items():
            for key, value in ((f"rel_{name}", jnp.linalg.norm(out, axis=-1) / h_norm),
                               (f"cos_{name}", cosine(out, h))):
                totals[key] = totals.get(key, 0.0) + _masked_mean(value, mask) * n
        count += n
    return {key: total / count for key, total in totals.items()}


def _skip(sites, layer: int) -> dict[str, Intervention]:
    """Zero the attention and MLP outputs of ``layer`` (the layer becomes the identity)."""
    n_layers = sites["resid_pre"].shape[0]
    mask = (jnp.arange(n_layers) == layer).astype(jnp.float32)[:, None, None, None]
    return {name: Intervention(scale=0.0, add=0.0, mask=mask)
            for name in ("attn_out", mlp_out_site(sites))}


def _kl(log_p, log_q):
    """``KL(p || q)`` over the last axis from log-probabilities."""
    return (jnp.exp(log_p) * (log_p - log_q)).sum(-1)


def skip_effects(model, params, tokens, token_mask=None):
    """Effects of skipping each layer ``s``: ``contribution_change`` (s, l), the mean
    relative change of layer ``l``'s contribution (NaN for ``l <= s``, which skipping ``s``
    cannot change or removes), ``output_kl`` (s,) = mean ``KL(p || p_skip s)`` of the next-token
    distributions and ``top1_agreement`` (s,)."""
    (batch, mask), = token_batches(tokens, token_mask, batch_size=len(tokens))
    sites = list_sites(model, batch)
    mlp = mlp_out_site(sites)
    n_layers = sites["resid_pre"].shape[0]

    def run(interventions):
        logits, acts = capture(model, params, batch, sites=("attn_out", mlp),
                               interventions=interventions)
        out = acts["attn_out"].astype(jnp.float32) + acts[mlp].astype(jnp.float32)
        return jax.nn.log_softmax(logits.astype(jnp.float32), -1), out

    log_p, base = run({})
    base_norm = jnp.maximum(jnp.linalg.norm(base, axis=-1), 1e-12)
    change = np.full((n_layers, n_layers), np.nan)
    kl, agree = np.zeros(n_layers), np.zeros(n_layers)
    for s in range(n_layers):
        log_q, out = run(_skip(sites, s))
        rel = jnp.linalg.norm(out - base, axis=-1) / base_norm  # (layer, batch, pos)
        change[s, s + 1:] = _masked_mean(rel, mask)[s + 1:]
        kl[s] = _masked_mean(_kl(log_p, log_q), mask)
        agree[s] = _masked_mean((log_p.argmax(-1) == log_q.argmax(-1)).astype(jnp.float32),
                                mask)
    return {"contribution_change": change, "output_kl": kl, "top1_agreement": agree}


def residual_states(model, params, tokens, token_mask=None):
    """The stream after each layer, embeddings first: ``(n_layers + 1, n_tokens, d_model)``
    over the positions where ``token_mask`` is true (float32)."""
    (batch, mask), = token_batches(tokens, token_mask, batch_size=len(tokens))
    _, acts = capture(model, params, batch, sites=("resid_pre", "resid_post"))
    states = jnp.concatenate([acts["resid_pre"][:1], acts["resid_post"]]).astype(jnp.float32)
    return np.asarray(states)[:, mask]


def _lens(model, params, *inputs, **kwargs):
    """``(log_p, states, lens)``: the model's log-probabilities, the stream before each layer
    and after the last (``n_layers + 1``, batch, pos, d_model), and ``lens(states)``, the
    log-probabilities (n, batch, pos, vocab) of the model's final norm and unembedding
    applied to ``n`` states at once (the last layer's ``resid_post`` patched to them, the
    inputs repeated ``n`` times along the batch: one forward)."""
    logits, acts = capture(model, params, *inputs, sites=("resid_pre", "resid_post"), **kwargs)
    n_layers = acts["resid_pre"].shape[0]
    states = jnp.concatenate([acts["resid_pre"], acts["resid_post"][-1:]])
    last = (jnp.arange(n_layers) == n_layers - 1).astype(jnp.float32)[:, None, None, None]
    batch = states.shape[1]

    def lens(chosen):
        n = chosen.shape[0]
        tile = lambda x: (jnp.concatenate([x] * n) if getattr(x, "ndim", 0)  # noqa: E731
                          and x.shape[0] == batch else x)
        out = intervene(model, params, *map(tile, inputs), interventions={
            "resid_post": Intervention(scale=0.0, add=chosen.reshape((-1,) + chosen.shape[2:]),
                                       mask=last)},
            **{key: tile(value) for key, value in kwargs.items()})
        out = jax.nn.log_softmax(out.astype(jnp.float32), -1)
        return out.reshape((n, batch) + out.shape[1:])
    return jax.nn.log_softmax(logits.astype(jnp.float32), -1), states, lens


def lens_labels(n_layers: int) -> list[str]:
    """Names of the lens entries, as TransformerLens's ``accumulated_resid``: ``"0_pre"``
    (the embeddings) ... ``"{n_layers - 1}_pre"``, ``"final_post"``."""
    return [f"{layer}_pre" for layer in range(n_layers)] + ["final_post"]


def logit_lens(model, params, tokens, token_mask=None, k: int = 5):
    """Logit lens after each layer (embeddings first, ``n_layers + 1`` entries): ``kl`` =
    mean ``KL(p_final || p_l)`` and ``topk_overlap`` = mean share of the final top-``k``
    tokens among layer ``l``'s top-``k``. ``p_l`` is the model's final norm and unembedding
    applied to the stream after layer ``l`` (the last layer's ``resid_post`` patched to it)."""
    (batch, mask), = token_batches(tokens, token_mask, batch_size=len(tokens))
    log_p, states, lens = _lens(model, params, batch)
    top_final = jax.lax.top_k(log_p, k)[1]
    kl, overlap = [], []
    for state in states:  # device values only: one host copy after the loop, not per layer
        log_q = lens(state[None])[0]
        top = jax.lax.top_k(log_q, k)[1]
        shared = (top_final[..., :, None] == top[..., None, :]).any(-1).mean(-1)
        kl.append(_masked_mean_device(_kl(log_p, log_q), mask))
        overlap.append(_masked_mean_device(shared, mask))
    return {"kl": np.asarray(jnp.stack(kl), np.float64),
            "topk_overlap": np.asarray(jnp.stack(overlap), np.float64)}


def logit_lens_top_k(model, params, *inputs, k: int = 5, **kwargs):
    """The ``k`` most likely next tokens read from the stream before each layer and after
    the last (labels: :func:`lens_labels`), by the model's final norm and unembedding:
    ``(ids, probs)``, each (``n_layers + 1``, batch, pos, k), best first. ``kwargs`` go to
    the model (e.g. ``attention_mask``)."""
    _, states, lens = _lens(model, params, *inputs, **kwargs)
    values, ids = jax.lax.top_k(lens(states), k)
    return np.asarray(ids), np.exp(np.asarray(values))


def ridge_r2(x, y, ridge: float = 1e-3, test_fraction: float = 0.25, seed: int = 0) -> float:
    """``R^2`` on held-out rows of the ridge map ``x -> y`` (rows are tokens).

    Fit on a random ``1 - test_fraction`` of the rows, centred, with penalty ``ridge *
    trace(X^T X) / d_x`` (scale-free), in float64; ``R^2 = 1 - SSE / SST`` summed over
    ``y``'s dimensions on the test rows."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (tokens, features) with the same tokens, got "
                         f"{x.shape} and {y.shape}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(test_fraction * len(x))
    if n_test < 1 or len(x) - n_test < 2:
        raise ValueError(f"{len(x)} tokens are too few to fit and test a map "
                         f"(test_fraction={test_fraction})")
    test, train = order[:n_test], order[n_test:]
    x_mean, y_mean = x[train].mean(0), y[train].mean(0)
    xt, yt = x[train] - x_mean, y[train] - y_mean
    gram = xt.T @ xt
    penalty = ridge * np.trace(gram) / gram.shape[0]
    weights = np.linalg.solve(gram + penalty * np.eye(gram.shape[0]), xt.T @ yt)
    predicted = (x[test] - x_mean) @ weights + y_mean
    sst = ((y[test] - y[test].mean(0)) ** 2).sum()
    return float(1.0 - ((y[test] - predicted) ** 2).sum() / max(sst, 1e-300))


def residual_map_r2(model_a, params_a, model_b, params_b, tokens, token_mask=None, **ridge):
    """``R^2[i, j]`` of ridge maps from model A's stream after layer ``i`` to model B's after
    layer ``j`` (embeddings = 0), both run on the same ``tokens``; see :func:`ridge_r2`."""
    vocab = {name: list_sites(m, np.asarray(tokens)[:1])["logits"].shape[-1]
             for name, m in (("A", model_a), ("B", model_b))}
    if vocab["A"] != vocab["B"]:
        raise ValueError(f"the models have different vocabularies ({vocab['A']} vs "
                         f"{vocab['B']} logits), so the same token ids mean different things; "
                         "compare models trained on the same tokenizer")
    states_a = residual_states(model_a, params_a, tokens, token_mask)
    states_b = residual_states(model_b, params_b, tokens, token_mask)
    return np.array([[ridge_r2(a, b, **ridge) for b in states_b] for a in states_a])
