"""Per-layer transcoders and residual-stream SAEs for a :class:`~mechinterp.models.Decoder`.

A transcoder approximates one layer's MLP through a wide, sparse feature layer::

    a = sigma(W_enc x + b_enc)            x = the MLP's input  (mlp_norm(resid_mid))
    y_hat = W_dec^T a + b_dec             y = the MLP's output (site ``mlp_out``)

and a residual SAE is the same module trained to reconstruct its own input (``y = x``).
``sigma`` is one of

- ``"relu"``: ``max(0, z)``, trained with the sparsity penalty
  ``lambda * sum_f a_f ||W_dec,f||`` (Anthropic, "Towards Monosemanticity" / April 2024 update);
- ``"topk"``: keep the ``k`` largest pre-activations (then ReLU), no penalty (Gao et al. 2024,
  "Scaling and evaluating sparse autoencoders");
- ``"jumprelu"``: ``z * H(z - theta)`` with a learned per-feature threshold ``theta``, trained
  with an L0 penalty ``lambda * sum_f H(z_f - theta_f)`` whose gradient with respect to
  ``theta`` comes from a straight-through estimator with a rectangle kernel of bandwidth
  ``eps`` (Rajamanoharan et al. 2024, "Jumping Ahead", eqs. 11-12)::

      d/dtheta JumpReLU(z)  := -(theta / eps) K((z - theta) / eps)
      d/dtheta H(z - theta) := -(1 / eps) K((z - theta) / eps),   K(u) = 1[|u| < 1/2]

  (the gradient with respect to ``z`` is the usual one: ``H(z - theta)`` for JumpReLU, 0
  for the step).

One :class:`Transcoder` is one layer; a model's transcoders are one parameter tree with a
leading layer axis (built with ``jax.vmap`` of ``init``), like the decoder's scanned layers.
Training streams activations: each step runs the decoder on a fresh batch of tokens
(:func:`mlp_activations`) and nothing is stored.

Splicing is an intervention on ``mlp_out`` (:func:`splice_interventions`): the MLP output is
replaced by the transcoder's output, plus the error term ``mlp_out - y_hat`` when asked,
which makes the spliced model reproduce the original exactly (to float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.api import capture, intervene
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
# Activations of a Decoder (no dependency on the family: parameters are read by name).


def _per_layer(params: Mapping, path: tuple[str, ...], n_layers: int) -> Array:
    """A per-layer parameter of a scanned (``layers``) or unrolled (``layers_i``) decoder."""
    params = nn.meta.unbox(params)

    def get(tree):
        for key in path:
            tree = tree[key]
        return tree
    if "layers" in params:
        return get(params["layers"])
    return jnp.stack([get(params[f"layers_{i}"]) for i in range(n_layers)])


def rms_normalize(x: Array, weight: Array, eps: float, frozen: bool = False) -> Array:
    """The decoder's RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)`` (normalized in float32).

    ``frozen``: the factor ``1 / sqrt(mean(x^2) + eps)`` is a constant for differentiation
    (``stop_gradient``), so the norm is linear in ``x`` (attribution graphs)."""
    h = x.astype(jnp.float32)
    factor = jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    if frozen:
        factor = jax.lax.stop_gradient(factor)
    return weight * (h * factor).astype(x.dtype)


def mlp_norm_weight(model, params) -> Array:
    """(layer, d_model): each layer's ``mlp_norm`` scale."""
    return _per_layer(params, ("mlp_norm", "scale"), model.config.n_layers)


def mlp_activations(model, params, tokens: Array, **kwargs) -> dict[str, Array]:
    """One forward of ``model``: ``resid_mid``, ``mlp_in`` (= ``mlp_norm(resid_mid)``, the
    MLP's input) and ``mlp_out``, each (layer, batch, pos, d_model)."""
    _, cache = capture(model, params, tokens, sites=("resid_mid", "mlp_out"), **kwargs)
    weight = mlp_norm_weight(model, params)[:, None, None, :]
    mlp_in = rms_normalize(cache["resid_mid"], weight, model.config.rms_norm_eps)
    return {"resid_mid": cache["resid_mid"], "mlp_in": mlp_in, "mlp_out": cache["mlp_out"]}


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


# ---------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How to train one transcoder (or SAE) per layer.

    The loss per token is ``sum_layers [ ||y - y_hat||^2 / d + lambda * sparsity ]`` on unit-
    scaled activations (``y`` divided by its centred RMS, so the batch mean of the first
    term is each layer's NMSE = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2), plus, when
    ``aux_k > 0``, the AuxK loss (Gao et al. 2024, section A.2)::

        L_aux = aux_coef * sum_layers ||e - e_hat||^2 / ||e - mean(e)||^2,
        e = y - y_hat (no gradient),  e_hat = W_dec^T TopK_aux(z restricted to dead features)

    which trains features that fired on none of the batch's tokens (dead within the last
    batch: the window is one batch of tokens) to explain what the live ones miss.
    ``batch_size`` counts sequences; ``learning_rate`` is Adam's (constant, no clipping).
    """

    n_features: int = 256
    activation: str = "relu"
    kind: str = "transcoder"
    k: int = 8
    sparsity_coef: float = 1e-3
    bandwidth: float = 0.05
    init_threshold: float = 0.05
    learning_rate: float = 1e-3
    steps: int = 500
    batch_size: int = 32
    aux_k: int = 0
    aux_coef: float = 1 / 32
    seed: int = 0

    def module(self, d_model: int) -> Transcoder:
        return Transcoder(d_in=d_model, d_out=d_model, n_features=self.n_features,
                          activation=self.activation, k=self.k, bandwidth=self.bandwidth,
                          init_threshold=self.init_threshold)


def auxk_nmse(pre: Array, acts: Array, residual: Array, w_dec: Array, weights: Array,
              aux_k: int) -> Array:
    """One layer's AuxK term (see :class:`TrainingConfig`): the NMSE of reconstructing
    ``residual`` (tokens, d) from the ``aux_k`` largest pre-activations ``pre`` (tokens, F)
    among features whose activations ``acts`` are zero on every weighted token; 0 when no
    feature is dead."""
    dead = ~jnp.any((acts > 0) & (weights[:, None] > 0), axis=0)
    masked = jnp.where(dead, pre, jnp.finfo(pre.dtype).min)
    values, index = jax.lax.top_k(masked, min(aux_k, pre.shape[-1]))
    values = jnp.where(dead[index], jax.nn.relu(values), 0.0)
    estimate = jnp.einsum("nk,nkd->nd", values, w_dec[index])
    residual = jax.lax.stop_gradient(residual)
    total = jnp.sum(weights)
    mean = jnp.sum(weights[:, None] * residual, axis=0) / total
    sse = jnp.sum(weights * jnp.sum((residual - estimate) ** 2, -1))
    sst = jnp.sum(weights * jnp.sum((residual - mean) ** 2, -1))
    return jnp.where(jnp.any(dead), sse / jnp.maximum(sst, 1e-12), 0.0)


DECODER, TRANSCODERS = "decoder", "transcoders"


class StreamedTranscoders(nn.Module):
    """What :func:`mechinterp.train.fit` trains: ``tokens (B, T) -> per-token loss (B, T)``.

    Parameters: ``decoder`` (those of ``model``, the analysed decoder; frozen: its
    activations are computed under ``stop_gradient`` and the optimizer freezes them) and
    ``transcoders`` (one per layer, leading layer axis). Each step runs the decoder on the batch's tokens and trains on its
    activations, so nothing is stored. ``x_scale``/``y_scale`` (one per layer) make inputs
    and targets unit-scale (:func:`unit_scale`); ``pad_id`` tokens are left out of the loss
    and of the dead-feature count. The AuxK loss is sown into ``aux_loss``, which the train
    step adds to the objective.
    """

    model: nn.Module
    transcoder: Transcoder
    config: TrainingConfig
    x_scale: tuple[float, ...]
    y_scale: tuple[float, ...]
    pad_id: int | None = None

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        # both run as pure functions of their parameters, not as bound submodules
        decoder, transcoder = self.model.clone(parent=None), self.transcoder.clone(parent=None)
        n_layers = decoder.config.n_layers
        decoder_params = self.param(DECODER, lambda key: decoder.init(key, tokens)["params"])
        tc_params = self.param(TRANSCODERS,
                               lambda key: init_layers(transcoder, key, n_layers))
        x, y = pairs(mlp_activations(decoder, jax.lax.stop_gradient(decoder_params), tokens),
                     self.config.kind)
        x = x / jnp.asarray(self.x_scale)[:, None, None]
        y = y / jnp.asarray(self.y_scale)[:, None, None]
        weights = (jnp.ones(tokens.size) if self.pad_id is None
                   else (tokens.reshape(-1) != self.pad_id).astype(jnp.float32))

        def layer(p, xi, yi):
            def parts(module, xi):
                y_hat, acts = module(xi)
                return y_hat, acts, module.pre(xi), module.sparsity(xi)
            y_hat, acts, pre, sparsity = nn.apply(parts, transcoder)({"params": p}, xi)
            per_token = (jnp.mean((yi - y_hat) ** 2, -1)
                         + self.config.sparsity_coef * sparsity)
            aux = (auxk_nmse(pre, acts, yi - y_hat, p["W_dec"], weights, self.config.aux_k)
                   if self.config.aux_k else jnp.zeros(()))
            return per_token, aux

        per_token, aux = jax.vmap(layer)(tc_params, x, y)
        if self.config.aux_k:
            self.sow("aux_loss", "auxk", self.config.aux_coef * jnp.sum(aux))
        return jnp.sum(per_token, axis=0).reshape(tokens.shape)


def _reconstruction_terms(per_token: Array, batch) -> dict[str, Array]:
    valid = _valid(batch)
    return {"loss": jnp.sum(per_token * valid), "weight": jnp.sum(valid)}


def _valid(batch) -> Array:
    valid = batch.get("valid")
    return (jnp.ones(batch["tokens"].shape) if valid is None
            else jnp.asarray(valid, jnp.float32))


def reconstruction_objective():
    """The :class:`mechinterp.train.Objective` of :class:`StreamedTranscoders`: the model's
    per-token loss summed over ``batch["valid"]`` tokens (all tokens without it)."""
    from mechinterp.train.losses import Objective  # analyses import the train stack lazily

    return Objective(name="reconstruction", inputs=lambda batch: (batch["tokens"],),
                     weight=lambda batch: jnp.sum(_valid(batch)),
                     terms=_reconstruction_terms)


class _WithValid:
    """A data source's examples plus ``valid`` (tokens that are not ``pad_id``)."""

    def __init__(self, source, pad_id: int | None):
        self.source, self.pad_id = source, pad_id

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        example = {k: np.asarray(v) for k, v in self.source[index].items()}
        tokens = example["tokens"]
        valid = np.ones(tokens.shape) if self.pad_id is None else tokens != self.pad_id
        return {"tokens": tokens, "valid": valid.astype(np.float32)}


def unit_scale(a: Array, weights: Array, centre: bool) -> Array:
    """(layer,) RMS per coordinate of ``a`` (layer, tokens, d) over weighted tokens,
    around the weighted mean when ``centre``."""
    total = jnp.sum(weights)
    if centre:
        a = a - jnp.sum(weights[None, :, None] * a, axis=1, keepdims=True) / total
    return jnp.sqrt(jnp.sum(weights[None] * jnp.mean(a * a, -1), axis=1) / total)


def fold_scales(tc_params, x_scale: Array, y_scale: Array) -> dict:
    """Parameters trained on ``x / x_scale -> y / y_scale`` as parameters on raw ``x -> y``:
    ``W_enc / x_scale``, ``W_dec * y_scale``, ``b_dec * y_scale``; activations (and so
    thresholds and TopK) are unchanged."""
    return {**tc_params, "W_enc": tc_params["W_enc"] / x_scale[:, None, None],
            "W_dec": tc_params["W_dec"] * y_scale[:, None, None],
            "b_dec": tc_params["b_dec"] * y_scale[:, None]}


@dataclasses.dataclass
class TrainedTranscoders:
    """A module, its per-layer parameters (leading layer axis, on raw activations), the
    training config and the training log (``metrics.jsonl`` records of the run)."""

    transcoder: Transcoder
    params: Any
    config: TrainingConfig
    history: list[dict[str, float]]


def train_transcoders(model, params, source, config: TrainingConfig, workdir,
                      *, pad_id: int | None = None, log_every: int = 50,
                      fit_overrides: Mapping[str, Any] | None = None) -> TrainedTranscoders:
    """Train one transcoder (or SAE) per layer of ``model`` with :func:`mechinterp.train.fit`
    on activations streamed from it (:class:`StreamedTranscoders`).

    ``source``: a random-access data source of ``{"tokens": (T,)}`` examples (e.g. a tfds
    split's ``as_data_source``); ``pad_id`` tokens are not trained on. ``workdir`` gets
    fit's metrics log and checkpoints (a run started again resumes). The scales and
    ``b_dec`` (the mean target) come from the first batch. ``fit_overrides``: entries of the
    fit config to change, e.g. ``{"mesh": {"data": 1}}``.
    """
    from mechinterp.train import default_config, fit  # the training stack, only when training
    from mechinterp.train.data import batches

    source = _WithValid(source, pad_id)
    first = next(batches(source, batch_size=config.batch_size, seed=config.seed))
    x, y = pairs(mlp_activations(model, params, jnp.asarray(first["tokens"])), config.kind)
    weights = jnp.asarray(first["valid"]).reshape(-1)
    x_scale, y_scale = unit_scale(x, weights, centre=False), unit_scale(y, weights, centre=True)
    mean = jnp.sum(weights[None, :, None] * y, axis=1) / jnp.sum(weights)

    transcoder = config.module(model.config.d_model)
    module = StreamedTranscoders(model, transcoder, config,
                                 tuple(np.asarray(x_scale).tolist()),
                                 tuple(np.asarray(y_scale).tolist()), pad_id)
    fit_config = default_config()
    fit_config.seed = config.seed
    fit_config.optimizer.update(name="adamw", learning_rate=config.learning_rate, b2=0.999,
                                weight_decay=0.0, clip_norm=0.0, freeze=(f"{DECODER}/.*",))
    fit_config.schedule.update(name="constant", warmup_steps=0)
    fit_config.data.batch_size = config.batch_size
    fit_config.train.update(steps=config.steps, log_every=log_every, eval_every=0,
                            checkpoint_every=config.steps, progress=False, tensorboard=False)
    for key, value in (fit_overrides or {}).items():
        fit_config[key] = value
    result = fit(fit_config, workdir, module, source, objective=reconstruction_objective(),
                 init_params={DECODER: params,
                              TRANSCODERS: {"b_dec": mean / y_scale[:, None]}})
    history = [json.loads(line) for line in
               (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line]
    return TrainedTranscoders(transcoder, fold_scales(result.state.params[TRANSCODERS],
                                                      x_scale, y_scale), config, history)


# ---------------------------------------------------------------------------------------
# Splicing (an intervention on mlp_out) and evaluation.


def _layer_mask(layers, n_layers: int) -> Array:
    mask = np.zeros(n_layers, np.float32)
    mask[list(range(n_layers)) if layers is None else list(layers)] = 1.0
    return jnp.asarray(mask)[:, None, None, None]


def splice_interventions(transcoder: Transcoder, tc_params, mlp_in: Array,
                         mlp_out: Array | None = None, layers: Iterable[int] | None = None
                         ) -> dict[str, Intervention]:
    """``{"mlp_out": patch}`` replacing the MLP output of ``layers`` (default all) by the
    transcoder's output on ``mlp_in`` (layer, batch, pos, d_model), plus the error term
    ``mlp_out - y_hat`` when ``mlp_out`` is given (then the patch reproduces ``mlp_out``)."""
    y_hat, _ = apply_layers(transcoder, tc_params, mlp_in)
    value = y_hat if mlp_out is None else y_hat + (mlp_out - y_hat)
    return {"mlp_out": Intervention.patch(value, mask=_layer_mask(layers, mlp_in.shape[0]))}


def spliced_logits(model, params, tokens: Array, transcoder: Transcoder, tc_params, *,
                   error_term: bool, layers: Iterable[int] | None = None) -> Array:
    """Logits with the MLPs of ``layers`` replaced by their transcoders.

    ``error_term=True``: one patched forward whose patch is ``y_hat + (mlp_out - y_hat)`` at
    the clean activations, so the logits equal the original ones (to float rounding).
    ``error_term=False``: each transcoder reads the MLP input of the spliced model. Layer
    ``l``'s input depends only on layers ``< l``, so recomputing the patch from the spliced
    model's own ``mlp_in`` ``n_layers`` times reaches the fixed point (n_layers + 1 forwards).
    """
    acts = mlp_activations(model, params, tokens)
    if error_term:
        ivs = splice_interventions(transcoder, tc_params, acts["mlp_in"], acts["mlp_out"], layers)
        return intervene(model, params, tokens, interventions=ivs)
    ivs = splice_interventions(transcoder, tc_params, acts["mlp_in"], layers=layers)
    for _ in range(model.config.n_layers - 1):
        acts = mlp_activations(model, params, tokens, interventions=ivs)
        ivs = splice_interventions(transcoder, tc_params, acts["mlp_in"], layers=layers)
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
        w = _valid(batch).reshape(-1)
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
            ablated = intervene(model, params, tokens,
                                interventions={"mlp_out": Intervention.zero()})
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
