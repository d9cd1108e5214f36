"""Transformer fusion with optimal transport (Imfeld et al., ICLR 2024), on the decoder and
the ViT.

Model A is aligned to model B layer by layer from their activations on the same inputs:
at every site a transport plan ``T`` between A's and B's units (uniform marginals; exact
assignment or Sinkhorn, ott-jax) gives ``M = T diag(1/beta)`` and each weight becomes
``W_A' = M_in^T W_A M_out``; then ``theta = (1 - w) theta_A' + w theta_B``. Heads move as
wholes: a head map from the heads' transport costs, times within-head maps, one for Q/K
(identity under RoPE, whose frequencies pin the dimensions) and one for V, which W_O takes
as input. Norm parameters follow the incoming map; the residual map after a sublayer is
the average of the incoming residual map and the sublayer's output map.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry
from ott.solvers import linear
from scipy.optimize import linear_sum_assignment

from mechinterp.site_io import capture
from mechinterp.models.decoder import Decoder
from mechinterp.models.vit import ViT

SOLVERS = ("exact", "sinkhorn")


def plan(x_a, x_b, solver: str = "sinkhorn", epsilon: float = 0.05) -> np.ndarray:
    """Transport plan (n, n) between the rows of ``x_a`` and ``x_b`` (units x samples) for
    the squared-Euclidean cost with uniform marginals ``1/n``: an exact assignment
    (``"exact"``, a permutation / n) or entropic Sinkhorn with ``epsilon`` relative to the
    mean cost (``"sinkhorn"``)."""
    cost = np.asarray(_sq_dist(x_a, x_b), np.float64)
    return plan_from_cost(cost, solver, epsilon)


def _sq_dist(x_a, x_b) -> np.ndarray:
    x_a, x_b = np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)
    return np.maximum((x_a ** 2).sum(1)[:, None] + (x_b ** 2).sum(1)[None]
                      - 2 * x_a @ x_b.T, 0.0)


def plan_from_cost(cost: np.ndarray, solver: str, epsilon: float) -> np.ndarray:
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"OT fusion needs equal widths; got a {cost.shape} cost matrix")
    if solver == "exact":
        rows, cols = linear_sum_assignment(cost)
        out = np.zeros((n, n))
        out[rows, cols] = 1.0 / n
        return out
    if solver != "sinkhorn":
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    scale = max(float(cost.mean()), 1e-12)
    return np.asarray(_sinkhorn(jnp.asarray(cost / scale, jnp.float32), epsilon), np.float64)


@functools.partial(jax.jit, static_argnums=1)
def _sinkhorn(cost, epsilon):
    geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
    return linear.solve(geom, max_iterations=2000, threshold=1e-6).matrix


def normalize(t: np.ndarray) -> np.ndarray:
    """``M = T diag(1/beta)``: B's unit j as a weighted average of A's units."""
    return t / np.maximum(t.sum(0, keepdims=True), 1e-30)


def _units(x, n_unit_axes: int = 1) -> np.ndarray:
    """(..., units...) activations -> (units, samples)."""
    x = np.asarray(x, np.float64)
    shape = x.shape[-n_unit_axes:]
    return x.reshape(-1, int(np.prod(shape))).T


def head_plan(qk_a, qk_b, v_a, v_b, *, rope: bool, solver: str, epsilon: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Plans for Q/K and V units (heads * d_head each) that move heads as wholes.

    ``qk_*`` / ``v_*``: (heads, d_head, samples). The head plan comes from the summed
    within-head transport costs of Q/K and V; the full plan of head pair (i, j) is
    ``T_head[i, j] * T_within_ij``. With ``rope`` the Q/K within-head plan is the identity.
    """
    h, dh = qk_a.shape[:2]
    cost = np.zeros((h, h))
    within_qk, within_v = {}, {}
    eye = np.eye(dh) / dh
    for i in range(h):
        for j in range(h):
            c_qk = np.asarray(_sq_dist(qk_a[i], qk_b[j]), np.float64)
            c_v = np.asarray(_sq_dist(v_a[i], v_b[j]), np.float64)
            within_qk[i, j] = eye if rope else plan_from_cost(c_qk, solver, epsilon)
            within_v[i, j] = plan_from_cost(c_v, solver, epsilon)
            cost[i, j] = (c_qk * within_qk[i, j]).sum() + (c_v * within_v[i, j]).sum()
    t_head = plan_from_cost(cost, solver, epsilon)
    full = []
    for within in (within_qk, within_v):
        t = np.zeros((h * dh, h * dh))
        for i in range(h):
            for j in range(h):
                t[i * dh:(i + 1) * dh, j * dh:(j + 1) * dh] = t_head[i, j] * within[i, j]
        full.append(t)
    return full[0], full[1]


def transformer_maps(acts_a: dict, acts_b: dict, n_layers: int, *, rope: bool,
                     solver: str = "sinkhorn", epsilon: float = 0.05) -> dict:
    """Every map (normalized, A units x B units) of a pre-norm transformer from its sites:
    ``("res", k)`` the residual entering layer k (``k = n_layers``: the final norm),
    ``("mid", l)``, ``("qk", l)``, ``("v", l)``, ``("attn_out", l)``, ``("hid", l)``,
    ``("mlp_out", l)``."""
    def solve(a, b):
        return normalize(plan(a, b, solver, epsilon))
    maps = {("res", 0): solve(_units(acts_a["embed"]), _units(acts_b["embed"]))}
    for l in range(n_layers):
        heads = []
        for acts in (acts_a, acts_b):
            q, k, v = (np.asarray(acts[f"attn.{s}"][l]) for s in "qkv")
            h, dh = q.shape[-2:]
            if k.shape[-2] != h:
                raise ValueError(f"OT fusion needs n_kv_heads == n_heads (got {k.shape[-2]} "
                                 f"and {h}): grouped K/V heads cannot follow a Q head map")
            qk = np.concatenate([q.reshape(-1, h, dh), k.reshape(-1, h, dh)], 0)
            heads.append((qk.transpose(1, 2, 0), v.reshape(-1, h, dh).transpose(1, 2, 0)))
        t_qk, t_v = head_plan(heads[0][0], heads[1][0], heads[0][1], heads[1][1], rope=rope,
                              solver=solver, epsilon=epsilon)
        maps["qk", l], maps["v", l] = normalize(t_qk), normalize(t_v)
        for name in ("attn_out", "mlp_out"):
            maps[name, l] = solve(_units(acts_a[name][l]), _units(acts_b[name][l]))
        maps["hid", l] = solve(_units(acts_a["mlp.hidden"][l]), _units(acts_b["mlp.hidden"][l]))
        maps["mid", l] = (maps["res", l] + maps["attn_out", l]) / 2
        maps["res", l + 1] = (maps["mid", l] + maps["mlp_out", l]) / 2
    return maps


# Layouts: parameter path -> one entry per axis (after the scanned layer axis, for paths
# under "layers"): None (kept), a map name, or (map name, k) for k axes flattened together.
DECODER_LAYOUT = {
    ("embedding",): (None, "res0"),
    ("lm_head",): ("resL", None),
    ("norm", "scale"): ("resL",),
    ("layers", "attn_norm", "scale"): ("res",),
    ("layers", "mlp_norm", "scale"): ("mid",),
    ("layers", "attn", "wq"): ("res", ("qk", 2)),
    ("layers", "attn", "wk"): ("res", ("qk", 2)),
    ("layers", "attn", "wv"): ("res", ("v", 2)),
    ("layers", "attn", "bq"): (("qk", 2),),
    ("layers", "attn", "bk"): (("qk", 2),),
    ("layers", "attn", "bv"): (("v", 2),),
    ("layers", "attn", "wo"): (("v", 2), "attn_out"),
    ("layers", "mlp", "gate"): ("mid", "hid"),
    ("layers", "mlp", "up"): ("mid", "hid"),
    ("layers", "mlp", "down"): ("hid", "mlp_out"),
}
VIT_LAYOUT = {
    ("patch_embed", "kernel"): (None, None, None, "res0"),
    ("patch_embed", "bias"): ("res0",),
    ("cls_token",): (None, None, "res0"),
    ("pos_embed",): (None, None, "res0"),
    ("norm", "scale"): ("resL",), ("norm", "bias"): ("resL",),
    ("head", "kernel"): ("resL", None), ("head", "bias"): (None,),
    ("layers", "norm1", "scale"): ("res",), ("layers", "norm1", "bias"): ("res",),
    ("layers", "norm2", "scale"): ("mid",), ("layers", "norm2", "bias"): ("mid",),
    **{k: v for k, v in DECODER_LAYOUT.items() if k[:2] == ("layers", "attn")},
    ("layers", "attn_out_bias"): ("attn_out",),
    ("layers", "mlp", "up"): ("mid", "hid"), ("layers", "mlp", "up_bias"): ("hid",),
    ("layers", "mlp", "down"): ("hid", "mlp_out"), ("layers", "mlp", "down_bias"): ("mlp_out",),
}


def _map(maps: dict, name: str, layer: int | None, n_layers: int) -> np.ndarray:
    if name == "res0":
        return maps["res", 0]
    if name == "resL":
        return maps["res", n_layers]
    return maps[name, layer]


def _apply(x, axes, maps, layer, n_layers):
    x = np.asarray(x, np.float64)
    shape, axis = list(x.shape), 0
    for entry in axes:
        name, k = entry if isinstance(entry, tuple) else (entry, 1)
        if name is not None:
            m = _map(maps, name, layer, n_layers)
            merged = x.reshape(shape[:axis] + [-1] + shape[axis + k:])
            out = np.moveaxis(np.tensordot(merged, m, axes=([axis], [0])), -1, axis)
            x = out.reshape(shape)
        axis += k
    return x


def align(params, maps: dict, layout: dict, n_layers: int):
    """A's parameters in B's basis: every axis named in ``layout`` contracted with its map
    (scanned parameters layer by layer). A parameter the layout does not name is an
    error naming it."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
    out = {}
    for path, x in flat:
        key = tuple(p.key for p in path)
        layer = None
        if key[0].startswith("layers_"):  # unrolled layers
            layer, key = int(key[0][len("layers_"):]), ("layers",) + key[1:]
        if key not in layout:
            raise KeyError(f"OT fusion has no alignment rule for parameter {'/'.join(key)}; "
                           f"known: {sorted('/'.join(k) for k in layout)}")
        if key[0] == "layers" and layer is None:
            y = np.stack([_apply(x[l], layout[key], maps, l, n_layers)
                          for l in range(n_layers)])
        else:
            y = _apply(x, layout[key], maps, layer, n_layers)
        out[tuple(p.key for p in path)] = jnp.asarray(y, x.dtype)
    return _unflatten(out)


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return tree


def average(params_a, params_b, weight_b: float = 0.5):
    """``(1 - w) theta_A + w theta_B``: vanilla fusion (or OT fusion after :func:`align`)."""
    return jax.tree.map(lambda a, b: (1 - weight_b) * a + weight_b * b,
                        nn.meta.unbox(params_a), nn.meta.unbox(params_b))


SITES = ("embed", "attn.q", "attn.k", "attn.v", "attn_out", "mlp.hidden", "mlp_out")


def layout_of(model) -> tuple[dict, bool]:
    """(parameter layout, whether Q/K carry RoPE) for a supported family."""
    if isinstance(model, Decoder):
        if model.config.n_experts or model.config.qk_norm:
            raise ValueError("OT fusion supports dense decoders without q/k-norm")
        return DECODER_LAYOUT, True
    if isinstance(model, ViT):
        if model.attention != "softmax" or model.norm != "layer":
            raise ValueError("OT fusion supports ViTs with softmax attention and LayerNorm")
        return VIT_LAYOUT, False
    raise TypeError(f"OT fusion supports Decoder and ViT, not {type(model).__name__}")


def ot_fuse(model, params_a, params_b, inputs, *, solver: str = "sinkhorn",
            epsilon: float = 0.05, weight_b: float = 0.5, return_maps: bool = False):
    """Align ``params_a`` to ``params_b`` on activations of ``inputs`` (a tuple of the
    model's call arguments) and average them. Both parents share ``model``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    layout, rope = layout_of(model)
    n_layers = model.config.n_layers if isinstance(model, Decoder) else model.n_layers
    acts = [capture(model, nn.meta.unbox(p), *inputs, sites=SITES)[1]
            for p in (params_a, params_b)]
    maps = transformer_maps(acts[0], acts[1], n_layers, rope=rope, solver=solver,
                            epsilon=epsilon)
    aligned = align(params_a, maps, layout, n_layers)
    fused = average(aligned, params_b, weight_b)
    return (fused, maps) if return_maps else fused
