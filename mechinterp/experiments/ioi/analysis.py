"""The IOI analyses of one template's batch, all through the library's entry points:
performance, DLA per head, attention from END to the names, patching grids (denoising:
clean activations into the ABC run) and path patching (noising, Wang et al. section 3.1)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import mechinterp as mi
from mechinterp import patching
from mechinterp.logit_attribution import logit_attribution
from mechinterp.path_patching import path_patch

GRIDS = {"resid_pre": patching.get_act_patch_resid_pre,
         "attn_out": patching.get_act_patch_attn_out,
         "heads": patching.get_act_patch_attn_head_out_all_pos}


def _diffs(logits, batch) -> np.ndarray:
    last = np.asarray(logits, np.float32)[:, -1]
    rows = np.arange(len(last))
    return last[rows, batch.io] - last[rows, batch.s]


def evaluate(lm, batch) -> dict:
    """Clean and ABC logit differences IO - S (per prompt), accuracy (IO above S; IO the
    top token), DLA per head (layer, head, prompt) and the clean run's attention from END
    (and from S2) to IO, S1, S1+1 and S2 (layer, head, prompt)."""
    logits, cache = mi.capture(lm.model, lm.params, jnp.asarray(batch.tokens),
                               sites=["attn.pattern"])
    corrupted = lm(jnp.asarray(batch.corrupted_tokens))
    dla = logit_attribution(lm.model, lm.params, jnp.asarray(batch.tokens),
                            tokens=jnp.asarray(batch.io), incorrect_tokens=jnp.asarray(batch.s))
    pattern = np.asarray(cache["attn.pattern"], np.float32)  # layer batch head query key
    rows, pos = np.arange(len(batch.io)), batch.positions

    def attention(query: str, key: str):
        return pattern[:, rows, :, pos[query], pos[key]].transpose(1, 2, 0)  # layer head prompt

    clean = _diffs(logits, batch)
    return {"clean": clean, "corrupted": _diffs(corrupted, batch),
            "accuracy": float((clean > 0).mean()),
            "top1": float((np.asarray(logits)[:, -1].argmax(-1) == batch.io).mean()),
            "dla": np.asarray(dla.heads, np.float32),
            "dla_check": float(np.abs(dla.logit_diff - clean).max()),
            "attn": {f"{q}->{k}": attention(q, k) for q, k in (
                ("END", "IO"), ("END", "S1"), ("END", "S2"), ("S2", "S1"), ("S2", "S1+1"))}}


def metric_of(batch):
    return mi.metrics.logit_diff(jnp.asarray(batch.io), jnp.asarray(batch.s))


def grids(lm, batch, ev: dict, names, progress: bool) -> dict:
    """Denoising grids, each normalized: 0 = the ABC run, 1 = the clean run."""
    tokens, corrupted = jnp.asarray(batch.tokens), jnp.asarray(batch.corrupted_tokens)
    fns = [GRIDS[name] for name in names]
    _, cache = mi.capture(lm.model, lm.params, tokens,
                          sites=sorted({s for f in fns for s in f.sites}))
    clean, corr = ev["clean"].mean(), ev["corrupted"].mean()
    return {name: np.asarray(patching.normalized_effect(
                fn(lm.model, lm.params, corrupted, cache, metric_of(batch), progress=progress),
                clean, corr)) for name, fn in zip(names, fns)}


def path_effect(lm, batch, ev: dict, cells, receivers=None, progress: bool = True):
    """Path patching (noising: sender = one head's ``attn.z`` at its ABC value, other heads
    frozen clean), as a fraction of the clean - ABC gap (-1: the whole gap), (layer, head),
    NaN where a head was not in ``cells``. The path ends at the final norm's output (the
    direct path to the logits) or, with ``receivers`` [(layer, head)], at their queries
    at END."""
    tokens, corrupted = jnp.asarray(batch.tokens), jnp.asarray(batch.corrupted_tokens)
    _, clean_cache = mi.capture(lm.model, lm.params, tokens, sites=["attn.z"])
    _, corrupted_cache = mi.capture(lm.model, lm.params, corrupted, sites=["attn.z"])
    receiver, mask = "final_norm", 1.0
    if receivers is not None:
        shape = clean_cache["attn.z"].shape  # layer batch pos head d_head
        mask = np.zeros((shape[0], 1, shape[2], shape[3], 1), np.float32)
        for layer, head in receivers:
            mask[layer, 0, -1, head] = 1.0
        receiver, mask = "attn.q", jnp.asarray(mask)
    values = path_patch(lm.model, lm.params, tokens, clean_cache, corrupted_cache,
                        metric_of(batch), "attn.z", ("layer", "head"), receiver, mask,
                        progress=progress, sender_cells=cells)
    clean = ev["clean"].mean()
    return (np.asarray(values) - clean) / (clean - ev["corrupted"].mean())
