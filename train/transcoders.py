"""Training transcoders and residual SAEs (:mod:`mechinterp.transcoders`) with
:func:`mechinterp.train.fit`, on activations streamed from the analysed model.

Each step runs the (frozen) model on a fresh batch of tokens and trains one transcoder per
layer on its activations (:class:`StreamedTranscoders`), so nothing is stored. The losses
(sparsity penalties, AuxK) are described in ``docs/transcoders.md``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.train.config import default_config
from mechinterp.train.data import batches
from mechinterp.train.loop import fit
from mechinterp.train.losses import Objective
from mechinterp.transcoders import (Transcoder, init_layers, mlp_activations, pairs,
                                    valid_weights)

Array = jax.Array


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
        n_layers = decoder.layer_structure().n_layers
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
    valid = valid_weights(batch)
    return {"loss": jnp.sum(per_token * valid), "weight": jnp.sum(valid)}



def reconstruction_objective():
    """The :class:`mechinterp.train.Objective` of :class:`StreamedTranscoders`: the model's
    per-token loss summed over ``batch["valid"]`` tokens (all tokens without it)."""
    return Objective(name="reconstruction", inputs=lambda batch: (batch["tokens"],),
                     weight=lambda batch: jnp.sum(valid_weights(batch)),
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
    source = _WithValid(source, pad_id)
    first = next(batches(source, batch_size=config.batch_size, seed=config.seed))
    x, y = pairs(mlp_activations(model, params, jnp.asarray(first["tokens"])), config.kind)
    weights = jnp.asarray(first["valid"]).reshape(-1)
    x_scale, y_scale = unit_scale(x, weights, centre=False), unit_scale(y, weights, centre=True)
    mean = jnp.sum(weights[None, :, None] * y, axis=1) / jnp.sum(weights)

    transcoder = config.module(x.shape[-1])
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

