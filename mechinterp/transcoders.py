"""Per-layer transcoders and residual-stream SAEs of any family with layer structure and
norm linearisation (:mod:`mechinterp.family`), e.g. :class:`~mechinterp.models.Decoder`.

A transcoder approximates one layer's MLP through a wide, sparse feature layer,
``a = sigma(W_enc x + b_enc)``, ``y_hat = W_dec^T a + b_dec`` with ``x`` the MLP's
normalized input and ``y`` its output (site ``mlp_out``); a residual SAE is the same module
trained to reconstruct its own input. ``sigma`` is ``"relu"``, ``"topk"`` or
``"jumprelu"`` (straight-through threshold gradients). A model's transcoders are one
parameter tree with a leading layer axis. Splicing is an intervention on the MLP output:
the transcoder's output, plus the error term ``mlp_out - y_hat`` when asked (then the
spliced model reproduces the original). Training: :mod:`mechinterp.train.transcoders`.
Design notes and references: ``docs/transcoders.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.site_io import capture, intervene
from mechinterp.family import HasLayers, LinearisableNorms, require
from mechinterp.interventions import Intervention

Array = jax.Array
ACTIVATIONS = ("relu", "topk", "jumprelu")


# ---------------------------------------------------------------------------------------
# JumpReLU with straight-through threshold gradients.


def _rectangle(u: Array) -> Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@jax.custom_vjp
def jumprelu(z: Array, threshold: Array, bandwidth: float) -> Array:
    """``z * H(z - threshold)``; threshold gradient by the rectangle-kernel estimator."""
    return z * (z > threshold).astype(z.dtype)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    z, threshold, bandwidth = res
    dz = g * (z > threshold).astype(z.dtype)
    dthreshold = g * -(threshold / bandwidth) * _rectangle((z - threshold) / bandwidth)
    dthreshold = jnp.sum(dthreshold.reshape(-1, *threshold.shape), axis=0)
    return dz, dthreshold, None


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(z: Array, threshold: Array, bandwidth: float) -> Array:
    """``H(z - threshold)`` (the L0 count); threshold gradient by the rectangle kernel."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step(z, threshold, bandwidth), (z, threshold, bandwidth)


def _step_bwd(res, g):
    z, threshold, bandwidth = res
    dthreshold = g * -(1.0 / bandwidth) * _rectangle((z - threshold) / bandwidth)
    dthreshold = jnp.sum(dthreshold.reshape(-1, *threshold.shape), axis=0)
    return jnp.zeros_like(z), dthreshold, None


step.defvjp(_step_fwd, _step_bwd)


def topk_relu(z: Array, k: int) -> Array:
    """Keep the ``k`` largest entries of the last axis (then ReLU), zero the rest."""
    _, indices = jax.lax.top_k(z, k)
    keep = jnp.sum(jax.nn.one_hot(indices, z.shape[-1], dtype=z.dtype), axis=-2)
    return jax.nn.relu(z) * keep


# ---------------------------------------------------------------------------------------
# The module.


def _centered_uniform(bound: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class Transcoder(nn.Module):
    """One layer's sparse replacement: ``x (..., d_in) -> (y_hat (..., d_out), a (..., F))``.

    Parameters ``W_enc`` (d_in, F), ``b_enc`` (F), ``W_dec`` (F, d_out), ``b_dec`` (d_out),
    and for ``"jumprelu"`` ``log_threshold`` (F). Methods: :meth:`pre` (pre-activations),
    :meth:`encode` (feature activations), :meth:`decode`, :meth:`threshold`. With
    ``d_out == d_in`` and ``y = x`` it is a residual SAE.
    """

    d_in: int
    d_out: int
    n_features: int
    activation: str = "relu"
    k: int = 8
    bandwidth: float = 0.05
    init_threshold: float = 0.05

    def setup(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {ACTIVATIONS}")
        if self.activation == "topk" and not 1 <= self.k <= self.n_features:
            raise ValueError(f"topk needs 1 <= k <= n_features={self.n_features}, got {self.k}")
        init = _centered_uniform(1.0 / np.sqrt(self.d_in))
        self.W_dec = self.param("W_dec", init, (self.n_features, self.d_out))
        self.W_enc = self.param("W_enc", init, (self.d_in, self.n_features))
        self.b_enc = self.param("b_enc", nn.initializers.zeros, (self.n_features,))
        self.b_dec = self.param("b_dec", nn.initializers.zeros, (self.d_out,))
        if self.activation == "jumprelu":
            self.log_threshold = self.param(
                "log_threshold", nn.initializers.constant(np.log(self.init_threshold)),
                (self.n_features,))

    def pre(self, x: Array) -> Array:
        """Pre-activations ``W_enc^T x + b_enc`` (the quantity graph edges explain)."""
        return x @ self.W_enc + self.b_enc

    def threshold(self) -> Array:
        """JumpReLU thresholds ``exp(log_threshold)`` (zeros for the other activations)."""
        if self.activation == "jumprelu":
            return jnp.exp(self.log_threshold)
        return jnp.zeros((self.n_features,))

    def encode(self, x: Array) -> Array:
        z = self.pre(x)
        if self.activation == "relu":
            return jax.nn.relu(z)
        if self.activation == "topk":
            return topk_relu(z, self.k)
        return jumprelu(z, self.threshold(), self.bandwidth)

    def decode(self, a: Array) -> Array:
        return a @ self.W_dec + self.b_dec

    def sparsity(self, x: Array) -> Array:
        """Per-token sparsity penalty before ``lambda``: sum_f a_f ||W_dec,f|| (relu),
        sum_f H(z_f - theta_f) with the straight-through gradient (jumprelu), 0 (topk)."""
        if self.activation == "relu":
            norms = jnp.linalg.norm(self.W_dec, axis=-1)
            return jnp.sum(self.encode(x) * norms, axis=-1)
        if self.activation == "jumprelu":
            return jnp.sum(step(self.pre(x), self.threshold(), self.bandwidth), axis=-1)
        return jnp.zeros(x.shape[:-1])

    def __call__(self, x: Array) -> tuple[Array, Array]:
        a = self.encode(x)
        return self.decode(a), a


@functools.partial(jax.jit, static_argnames=("transcoder", "n_layers"))
def init_layers(transcoder: Transcoder, key: Array, n_layers: int) -> dict:
    """Parameters of ``n_layers`` independent transcoders, stacked on a leading layer axis."""
    x = jnp.zeros((1, transcoder.d_in))
    keys = jax.random.split(key, n_layers)
    return jax.vmap(lambda k: transcoder.init(k, x)["params"])(keys)


@functools.partial(jax.jit, static_argnames=("transcoder", "method"))
def apply_layers(transcoder: Transcoder, tc_params, x: Array, method: str = "__call__"):
    """Apply every layer's transcoder to its own slice of ``x`` (layer, ..., d_in)."""
    def one(p, xi):
        return transcoder.apply({"params": p}, xi, method=getattr(Transcoder, method))
    return jax.vmap(one)(tc_params, x)


def layer_params(tc_params, layer: int) -> dict:
    """One layer's parameters out of the stacked tree."""
    return jax.tree.map(lambda a: a[layer], tc_params)


# ---------------------------------------------------------------------------------------
# A model's MLP activations, through the family protocol.


def mlp_sites(model, needed_by: str = "transcoders"):
    """The sites of ``model``'s MLP sublayer (:class:`~mechinterp.family.SublayerSites`)."""
    return require(model, HasLayers, needed_by).layer_structure().sublayers["mlp"]


def mlp_activations(model, params, tokens: Array, **kwargs) -> dict[str, Array]:
    """One forward of ``model``: ``resid_mid`` (the MLP's residual input), ``mlp_in`` (its
    normalized input, :meth:`~mechinterp.family.LinearisableNorms.sublayer_input`) and
    ``mlp_out`` (its output), each (layer, batch, pos, d_model)."""
    sites = mlp_sites(model, "mlp_activations")
    require(model, LinearisableNorms, "mlp_activations")
    _, cache = capture(model, params, tokens, sites=(sites.residual_in, sites.output), **kwargs)
    mlp_in = model.sublayer_input(params, "mlp", cache[sites.residual_in])
    return {"resid_mid": cache[sites.residual_in], "mlp_in": mlp_in,
            "mlp_out": cache[sites.output]}


def pairs(activations: Mapping[str, Array], kind: str) -> tuple[Array, Array]:
    """``(inputs, targets)`` for ``kind="transcoder"`` (mlp_in -> mlp_out) or ``"sae"``
    (resid_mid -> resid_mid), flattened to (layer, tokens, d_model)."""
    if kind == "transcoder":
        x, y = activations["mlp_in"], activations["mlp_out"]
    elif kind == "sae":
        x = y = activations["resid_mid"]
    else:
        raise ValueError(f"kind must be 'transcoder' or 'sae', got {kind!r}")
    return x.reshape(x.shape[0], -1, x.shape[-1]), y.reshape(y.shape[0], -1, y.shape[-1])


def valid_weights(batch) -> Array:
    """A batch's ``valid`` weights (batch, pos) as float32, ones without them."""
    valid = batch.get("valid")
    return (jnp.ones(batch["tokens"].shape) if valid is None
            else jnp.asarray(valid, jnp.float32))


# ---------------------------------------------------------------------------------------
# Splicing (an intervention on mlp_out) and evaluation.


def _layer_mask(layers, n_layers: int) -> Array:
    mask = np.zeros(n_layers, np.float32)
    mask[list(range(n_layers)) if layers is None else list(layers)] = 1.0
    return jnp.asarray(mask)[:, None, None, None]


def splice_interventions(transcoder: Transcoder, tc_params, mlp_in: Array,
                         mlp_out: Array | None = None, layers: Iterable[int] | None = None,
                         site: str = "mlp_out") -> dict[str, Intervention]:
    """``{site: patch}`` replacing the MLP output (``site``) of ``layers`` (default all) by
    the transcoder's output on ``mlp_in`` (layer, batch, pos, d_model), plus the error term
    ``mlp_out - y_hat`` when ``mlp_out`` is given (then the patch reproduces ``mlp_out``)."""
    y_hat, _ = apply_layers(transcoder, tc_params, mlp_in)
    value = y_hat if mlp_out is None else y_hat + (mlp_out - y_hat)
    return {site: Intervention.patch(value, mask=_layer_mask(layers, mlp_in.shape[0]))}


def spliced_logits(model, params, tokens: Array, transcoder: Transcoder, tc_params, *,
                   error_term: bool, layers: Iterable[int] | None = None) -> Array:
    """Logits with the MLPs of ``layers`` replaced by their transcoders.

    ``error_term=True``: one patched forward whose patch is ``y_hat + (mlp_out - y_hat)`` at
    the clean activations, so the logits equal the original ones (to float rounding).
    ``error_term=False``: each transcoder reads the MLP input of the spliced model. Layer
    ``l``'s input depends only on layers ``< l``, so recomputing the patch from the spliced
    model's own ``mlp_in`` ``n_layers`` times reaches the fixed point (n_layers + 1 forwards).
    """
    site = mlp_sites(model, "spliced_logits").output
    acts = mlp_activations(model, params, tokens)
    if error_term:
        ivs = splice_interventions(transcoder, tc_params, acts["mlp_in"], acts["mlp_out"], layers,
                                   site)
        return intervene(model, params, tokens, interventions=ivs)
    ivs = splice_interventions(transcoder, tc_params, acts["mlp_in"], layers=layers, site=site)
    for _ in range(model.layer_structure().n_layers - 1):
        acts = mlp_activations(model, params, tokens, interventions=ivs)
        ivs = splice_interventions(transcoder, tc_params, acts["mlp_in"], layers=layers,
                                   site=site)
    return intervene(model, params, tokens, interventions=ivs)


def next_token_loss(logits: Array, tokens: Array, valid: Array | None = None) -> float:
    """Mean cross entropy of ``logits[:, t]`` against ``tokens[:, t + 1]`` over positions
    whose target is ``valid``."""
    valid = jnp.ones(tokens.shape) if valid is None else jnp.asarray(valid, jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
    return float(jnp.sum(losses * valid[:, 1:]) / jnp.sum(valid[:, 1:]))


def evaluate(model, params, transcoder: Transcoder, tc_params,
             batches: Iterable[Mapping[str, Array]], kind: str = "transcoder"
             ) -> dict[str, Any]:
    """Standard metrics over ``batches`` (``{"tokens": (B, T), "valid": (B, T) optional,
    "loss_mask": (B, T) optional}``, e.g. from :func:`activation_batches`), per layer:

    - ``mse``: mean over tokens of ``||y - y_hat||^2``;
    - ``fve``: fraction of variance explained, ``1 - SSE / SST`` (SST around the mean of
      all evaluated tokens);
    - ``l0``: mean number of active features per token;
    - ``dead_fraction``: share of features that never fired on any evaluated token;

    and, for transcoders, the next-token loss (positions marked by the batch's
    ``loss_mask``, else ``valid``) of the clean model, of the model with every
    MLP spliced without the error term (``loss_spliced``; with it the loss is the clean one),
    with every MLP zero-ablated, and ``loss_recovered`` =
    ``(loss_ablated - loss_spliced) / (loss_ablated - loss_clean)``.
    """
    sums = {"sse": 0.0, "y": 0.0, "yy": 0.0, "n": 0.0, "l0": 0.0, "fired": 0.0}
    losses = {"clean": [], "spliced": [], "ablated": []}
    for batch in batches:
        tokens = jnp.asarray(batch["tokens"])
        x, y = pairs(mlp_activations(model, params, tokens), kind)
        w = valid_weights(batch).reshape(-1)
        y_hat, a = apply_layers(transcoder, tc_params, x)
        w_ = w[None, :, None]
        sums["sse"] += np.asarray(jnp.sum(w_ * (y - y_hat) ** 2, axis=(1, 2)))
        sums["y"] += np.asarray(jnp.sum(w_ * y, axis=1))
        sums["yy"] += np.asarray(jnp.sum(w_ * y ** 2, axis=(1, 2)))
        sums["n"] += float(jnp.sum(w))
        sums["l0"] += np.asarray(jnp.sum(w[None] * jnp.sum(a > 0, -1), axis=1))
        sums["fired"] += np.asarray(jnp.sum(w_ * (a > 0), axis=1))
        if kind == "transcoder":
            scored = batch.get("loss_mask", batch.get("valid"))
            clean = intervene(model, params, tokens, interventions={})
            spliced = spliced_logits(model, params, tokens, transcoder, tc_params,
                                     error_term=False)
            ablated = intervene(model, params, tokens, interventions={
                mlp_sites(model, "evaluate").output: Intervention.zero()})
            for name, logits in (("clean", clean), ("spliced", spliced), ("ablated", ablated)):
                losses[name].append(next_token_loss(logits, tokens, scored))
    n = sums["n"]
    sst = sums["yy"] - np.sum(sums["y"] ** 2, axis=-1) / n
    out = {
        "mse": sums["sse"] / n,
        "fve": 1.0 - sums["sse"] / sst,
        "l0": sums["l0"] / n,
        "dead_fraction": np.mean(sums["fired"] == 0, axis=-1),
    }
    if kind == "transcoder":
        clean, spliced, ablated = (float(np.mean(losses[k])) for k in ("clean", "spliced", "ablated"))
        out.update(loss_clean=clean, loss_spliced=spliced, loss_ablated=ablated,
                   loss_recovered=(ablated - spliced) / (ablated - clean))
    return out


# ---------------------------------------------------------------------------------------
# Feature interventions.


def steer_features(tc_params, features: Iterable[tuple[int, int, int]],
                   deltas: Iterable[float], shape: tuple[int, ...]) -> dict[str, Intervention]:
    """``{"mlp_out": steer}`` adding ``delta * W_dec[layer, feature]`` to the MLP output at
    ``(layer, pos)`` for each ``(layer, pos, feature)``, in every batch row. ``shape`` is the
    ``mlp_out`` site's shape (layer, batch, pos, d_model). Ablating a feature of activation
    ``a`` is ``delta = -a``; scaling it by ``c`` is ``delta = (c - 1) a``."""
    add = jnp.zeros(shape, tc_params["W_dec"].dtype)
    for (layer, pos, feature), delta in zip(features, deltas, strict=True):
        add = add.at[layer, :, pos].add(delta * tc_params["W_dec"][layer, feature])
    return {"mlp_out": Intervention.steer(add)}


def activation_batches(example_source: Callable[[int], Mapping[str, np.ndarray]],
                       batch_size: int, pad_id: int | None = None, seed: int = 0
                       ) -> Iterator[dict[str, Array]]:
    """Endless batches from ``example_source(index) -> {"tokens": (T,), "loss_mask": (T,)
    optional}`` at random indices: ``tokens``, ``valid`` (not ``pad_id``: the positions
    whose activations are trained on) and ``loss_mask`` when the examples have one (the
    positions scored by the spliced-model loss in :func:`evaluate`)."""
    rng = np.random.default_rng(seed)
    while True:
        examples = [example_source(int(i)) for i in rng.integers(0, 2**31, batch_size)]
        tokens = np.stack([e["tokens"] for e in examples])
        valid = np.ones(tokens.shape, np.float32) if pad_id is None else (tokens != pad_id)
        batch = {"tokens": jnp.asarray(tokens), "valid": jnp.asarray(valid, jnp.float32)}
        if "loss_mask" in examples[0]:
            batch["loss_mask"] = jnp.asarray(np.stack([e["loss_mask"] for e in examples]),
                                             jnp.float32)
        yield batch
