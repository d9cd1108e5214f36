"""Shared helpers for the training tests (no tests here): a small language model and a
classifier whose parameters carry logical axis names like the real families', so sharding
and training tests compile in a second or two."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mechinterp.train.step import AUX_LOSS


def _param(module, name, axes, shape, init=nn.initializers.normal(0.1)):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape)


class ToyLM(nn.Module):
    """Token embedding, a causal running mean, one MLP and an unembedding.

    Parameters use the logical axes 'vocab', 'embed', 'mlp'. With ``aux_weight`` it sows
    ``aux_weight * mean(hidden**2)`` into the 'aux_loss' collection; with ``dropout`` it
    applies dropout to the hidden layer unless ``deterministic``.
    """

    vocab: int = 32
    d_model: int = 16
    d_mlp: int = 32
    aux_weight: float = 0.0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True):
        embedding = _param(self, "embedding", ("vocab", "embed"), (self.vocab, self.d_model))
        x = jnp.take(embedding, tokens, axis=0)
        counts = jnp.arange(1, tokens.shape[1] + 1, dtype=x.dtype)[None, :, None]
        x = x + jnp.cumsum(x, axis=1) / counts
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        w_in = _param(self, "w_in", ("embed", "mlp"), (self.d_model, self.d_mlp))
        b_in = _param(self, "b_in", ("mlp",), (self.d_mlp,), nn.initializers.zeros)
        w_out = _param(self, "w_out", ("mlp", "embed"), (self.d_mlp, self.d_model))
        hidden = nn.gelu(x @ w_in.astype(x.dtype) + b_in.astype(x.dtype))
        if self.aux_weight:
            penalty = jnp.mean(hidden.astype(jnp.float32) ** 2)
            self.sow(AUX_LOSS, "hidden_l2", self.aux_weight * penalty)
        if self.dropout:
            hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        x = x + hidden @ w_out.astype(x.dtype)
        lm_head = _param(self, "lm_head", ("embed", "vocab"), (self.d_model, self.vocab))
        return x @ lm_head.astype(x.dtype)


class ToyClassifier(nn.Module):
    """(batch, features) -> (batch, classes) through one hidden layer (logical axes)."""

    features: int = 8
    hidden: int = 16
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        w1 = _param(self, "w1", ("embed", "mlp"), (self.features, self.hidden))
        w2 = _param(self, "w2", ("mlp", "vocab"), (self.hidden, self.classes))
        return nn.relu(x @ w1) @ w2


def token_batch(batch=16, length=12, vocab=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = (rng.random((batch, length)) < 0.8).astype(np.int32)
    return {"tokens": tokens, "loss_mask": mask}


def token_rows(n, seed=3):
    """``n`` token examples as a list of row dicts (a map-style data source)."""
    rows = token_batch(batch=n, seed=seed)
    return [{k: v[i] for k, v in rows.items()} for i in range(n)]


def toy_train_config(steps, warmup_steps, checkpoint_every):
    """``train.config.default_config()`` for the toy runs: batch 8, a record every step, no
    progress bar."""
    from mechinterp.train.config import default_config

    config = default_config()
    config.data.batch_size = 8
    config.schedule.warmup_steps = warmup_steps
    config.train.steps = steps
    config.train.log_every = 1
    config.train.checkpoint_every = checkpoint_every
    config.train.progress = False
    return config
