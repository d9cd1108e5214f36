"""DiT-MoE (Fei et al., 2024), small: sparse vs dense diffusion transformers at equal
active parameters, and where experts specialize (time step, class, position).

    mechinterp run configs/dit_moe.py                 # default: 3 seeds
    mechinterp run configs/dit_moe.py preset=smoke    # seconds; the CI smoke test

Trains a class-conditional rectified-flow DiT-MoE and a dense DiT per seed on sklearn
digits at their native 8x8 (``data.kind=shapes``: coloured shapes on textured
backgrounds), judges Euler samples (classifier-free guidance) with a CNN trained here
(accuracy, Fréchet distance: not FID), reads ``moe.weights`` at every sampler step, ablates and forces experts
(:mod:`mechinterp.experiments.dit_moe`). Writes report.md, samples_*.png, routing.png and
results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.size": 8, "model.patch_size": 4, "model.d_model": 16,
              "model.n_layers": 1, "model.n_heads": 2, "model.n_experts": 4, "model.d_expert": 8,
              "model.d_shared": 8, "model.freq_dim": 16, "train.steps": 30,
              "train.batch_size": 32, "train.repeats": 1, "train.warmup_steps": 5, "judge.steps": 30,
              "judge.width": 8, "judge.n_layers": 1, "analysis.samples_per_class": 4,
              "analysis.grid_per_class": 2, "analysis.sampling_steps": 4,
              "analysis.eval_images": 64, "analysis.edit_images": 16,
              "analysis.t_values": (0.25, 0.75)},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.dit_moe:run", workdir="runs/dit_moe")
    c.seeds = 3

    c.data = ml_collections.ConfigDict()
    c.data.kind = "digits"  # or "shapes" (coloured shapes on textured backgrounds)
    c.data.size = 8  # digits are 8x8: upsampling only adds pixels to model
    c.data.per_class = 150  # shapes only

    c.model = ml_collections.ConfigDict()
    c.model.patch_size = 2
    c.model.d_model = 48
    c.model.n_layers = 3
    c.model.n_heads = 4
    c.model.freq_dim = 64
    c.model.n_experts = 8
    c.model.top_k = 2
    c.model.d_expert = 24
    c.model.d_shared = 48  # dense baseline: SwiGLU with d_mlp = top_k * d_expert + d_shared
    c.model.balance_coef = 0.01

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2400
    c.train.batch_size = 64
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 50
    c.train.repeats = 120  # passes over the images, each with fresh noise and times
    c.train.label_dropout = 0.1  # classifier-free guidance: labels dropped to a null class

    c.judge = ml_collections.ConfigDict()
    c.judge.width = 16
    c.judge.n_layers = 2
    c.judge.steps = 300
    c.judge.batch_size = 64
    c.judge.learning_rate = 3e-3

    c.analysis = ml_collections.ConfigDict()
    c.analysis.t_values = (0.1, 0.3, 0.5, 0.7, 0.9)
    c.analysis.eval_images = 200
    c.analysis.samples_per_class = 16
    c.analysis.grid_per_class = 8
    c.analysis.sampling_steps = 32
    c.analysis.guidance = 3.0  # classifier-free guidance scale w (1: none)
    c.analysis.edit_images = 48
    c.analysis.edit_t_values = (0.9, 0.1)  # high noise first, then low noise
    return kit.with_preset(c, PRESETS, arg)
