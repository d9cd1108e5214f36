"""Transformer fusion with optimal transport (Imfeld et al., 2024), small.

    mechinterp run configs/ot_fusion.py                 # default: 3 seeds (parent pairs)
    mechinterp run configs/ot_fusion.py preset=smoke    # seconds; the CI smoke test

Two independently trained ViTs (digits) and decoders (copy task) per seed, fused by
vanilla averaging and OT fusion (exact and Sinkhorn), before and after a short fine-tune
(:mod:`mechinterp.experiments.ot_fusion`). Writes report.md, ot_fusion.png, results.json.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "families": ("vit",), "vit.steps": 10,
              "decoder.steps": 10, "finetune.steps": 3, "vit.d_model": 16, "vit.d_mlp": 16,
              "decoder.d_model": 16, "decoder.d_mlp": 16, "decoder.num_train": 256,
              "align_examples": 64, "batch_size": 32},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.ot_fusion:run", workdir="runs/ot_fusion")
    c.seeds = 3
    c.families = ("vit", "decoder")
    c.batch_size = 64
    c.align_examples = 256     # inputs whose activations define the transport costs
    c.epsilon = 0.05           # Sinkhorn regularization, relative to the mean cost

    c.vit = ml_collections.ConfigDict(
        {"patch_size": 2, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_mlp": 64,
         "steps": 600, "learning_rate": 2e-3})
    c.decoder = ml_collections.ConfigDict(
        {"vocab": 16, "half": 8, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_mlp": 64,
         "num_train": 4096, "num_test": 512, "steps": 800, "learning_rate": 3e-3})
    c.finetune = ml_collections.ConfigDict({"steps": 60})  # Adam at the training rate
    return kit.with_preset(c, PRESETS, arg)
