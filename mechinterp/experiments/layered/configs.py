"""Config blocks the layered reproductions share, set in place on a ``ConfigDict``:
:func:`dit` (configs/lasagna.py, configs/layerbind.py: one small DiT, trained and sampled
the same way) and :func:`conv` (configs/layer_decomp.py, configs/workflow_layers.py: the
dilated-convolution trunk of :func:`mechinterp.experiments.layered.conv.trunk`)."""

from __future__ import annotations

import ml_collections

# the smoke-preset keys of dit()'s blocks (configs add their own on top)
DIT_SMOKE = {"seeds": 1, "data.size": 8, "model.d_model": 8, "model.n_layers": 1,
             "model.n_heads": 1, "model.d_mlp": 8, "model.freq_dim": 8, "train.steps": 2,
             "train.batch_size": 4, "eval.n_samples": 3, "eval.n_steps": 2}


def dit(c: ml_collections.ConfigDict) -> None:
    """``c.data`` (16 px scenes, 2048 train), ``c.model`` (a 3-layer DiT on 2 px patches),
    ``c.train`` (2000 flow-matching steps) and ``c.eval`` (64 samples, 16 Euler steps)."""
    c.data = ml_collections.ConfigDict({"size": 16, "n_train": 2048})
    c.model = ml_collections.ConfigDict({"patch_size": 2, "d_model": 48, "n_layers": 3,
                                         "n_heads": 3, "d_mlp": 96, "freq_dim": 32})
    c.train = ml_collections.ConfigDict({"steps": 2000, "batch_size": 32,
                                         "learning_rate": 1e-3})
    c.eval = ml_collections.ConfigDict({"n_samples": 64, "n_steps": 16})


def conv(c: ml_collections.ConfigDict) -> None:
    """``c.model`` (width 16, dilations 1, 2, 4, 1) and ``c.train`` (400 Adam steps)."""
    c.model = ml_collections.ConfigDict({"width": 16, "dilations": (1, 2, 4, 1)})
    c.train = ml_collections.ConfigDict({"steps": 400, "batch_size": 16,
                                         "learning_rate": 2e-3})
