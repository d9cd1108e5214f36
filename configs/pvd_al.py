"""PVD-AL (Fang et al., 2023), small: any-to-any distillation among 2-D fields.

    mechinterp run configs/pvd_al.py                 # default: 3 seeds
    mechinterp run configs/pvd_al.py preset=smoke    # seconds; the CI smoke test

MLP (positional encoding), dense grid and hash grid fields of a synthetic flatland scene:
teachers from renders, students from scratch and distilled with staged losses and active
sampling at equal process time (:mod:`mechinterp.experiments.pvd_al`). Writes report.md,
pvd_al.png and results.json.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "kinds": ("hash",), "teacher_steps": 20,
              "scratch_steps": 6, "batch": 16, "data.rays": 16, "data.n_samples": 12,
              "data.train_views": 4, "data.test_views": 2, "data.pool_views": 4,
              "field.width": 16, "field.d_feature": 8, "field.head_width": 8,
              "field.levels": 3, "field.grid_resolution": 8},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.pvd_al:run", workdir="runs/pvd_al")
    c.seeds = 3
    c.kinds = ("mlp", "grid", "hash")
    c.teacher_steps = 2000
    c.scratch_steps = 200       # the students' budget: this many scratch steps' time
    c.batch = 64                # rays per step
    c.learning_rate = ml_collections.ConfigDict({"mlp": 3e-3, "grid": 3e-2, "hash": 1e-2})
    c.data = ml_collections.ConfigDict(
        {"n_discs": 5, "rays": 64, "n_samples": 32, "train_views": 16, "test_views": 8,
         "pool_views": 64})
    c.field = ml_collections.ConfigDict(
        {"d_feature": 32, "head_width": 32, "n_freqs": 6, "width": 64, "depth": 3,
         "grid_resolution": 32, "grid_features": 8, "levels": 8, "table_size": 2 ** 10,
         "level_features": 2, "min_resolution": 4, "growth": 1.5})
    # stages: fractions of the distillation steps on features, then density/colour
    c.distill = ml_collections.ConfigDict({"stages": (0.1, 0.4), "ablation_student": "hash"})
    return kit.with_preset(c, PRESETS, arg)
