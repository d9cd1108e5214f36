"""PVD-AL (Fang et al., 2023), small: any-to-any distillation among 2-D field
representations (MLP with positional encoding, dense grid, hash grid;
:mod:`mechinterp.models.fields`) against training from scratch at equal time.

Per seed: every kind is trained from the ground-truth renders of a synthetic flatland
scene (:mod:`.scene`) as a teacher; every kind is trained from scratch for a short budget;
every (teacher, student) pair is distilled with PVD-AL (staged losses, active sampling of
hard rays) for the same process time as the student's scratch budget. Ablations on one
student: render-only distillation and staged without active sampling. PSNR on held-out
views.
"""

from __future__ import annotations

import jax
import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.pvd_al import report
from mechinterp.experiments.pvd_al import scene as sc
from mechinterp.experiments.pvd_al.distill import Trainer
from mechinterp.models.fields import Field


class Trainers(dict):
    """One :class:`Trainer` per (student, teacher or None), built once: their compiled
    steps serve every seed."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.fields = {k: Field(kind=k, **config.field.to_dict()) for k in config.kinds}

    def __missing__(self, key):
        student, teacher = key
        self[key] = Trainer(self.fields[student], teacher and self.fields[teacher],
                            n_samples=self.config.data.n_samples,
                            learning_rate=self.config.learning_rate[student])
        return self[key]


def inherit_head(student: dict, teacher: dict) -> dict:
    """The student starts from the teacher's head (every kind shares its shape), so
    matching the shared ``feature`` site already matches density and colour."""
    return {**student, **{k: teacher[k] for k in ("head_hidden", "head_out")}}


def run_seed(config, trainers, seed, rays, targets, eval_fn) -> dict:
    d, kinds, batch = config.distill, list(config.kinds), config.batch
    out = {"teacher": {}, "scratch": {}, "pvd_al": {}, "ablation": {}, "steps": {}}
    teachers, budget = {}, {}
    for kind in kinds:
        trainer = trainers[kind, None]
        teachers[kind], _ = trainer.fit(trainer.init(seed), rays["train"], targets["train"],
                                        steps=config.teacher_steps, batch=batch, seed=seed)
        out["teacher"][kind] = eval_fn(trainer, teachers[kind])
        params = trainer.init(seed + 100)
        budget[kind] = config.scratch_steps * trainer.seconds_per_step(
            params, None, rays["train"], targets["train"], batch)
        params, _ = trainer.fit(params, rays["train"], targets["train"],
                                steps=config.scratch_steps, batch=batch, seed=seed + 100)
        out["scratch"][kind] = eval_fn(trainer, params)
    modes = {"pvd_al": (tuple(d.stages), True), "render_only": (None, False),
             "staged_no_active": (tuple(d.stages), False)}
    for teacher in kinds:
        for student in kinds:
            trainer = trainers[student, teacher]
            init = inherit_head(trainer.init(seed + 100), teachers[teacher])
            per_step = trainer.seconds_per_step(init, teachers[teacher], rays["pool"], None,
                                                batch)
            pair = f"{teacher}->{student}"
            out["steps"][pair] = steps = max(1, round(budget[student] / per_step))
            for mode, (stages, active) in modes.items():
                if mode != "pvd_al" and student != d.ablation_student:
                    continue
                params, _ = trainer.fit(init, rays["pool"], None, steps=steps, batch=batch,
                                        seed=seed + 100, t_params=teachers[teacher],
                                        stages=stages, active=active)
                where = out["pvd_al"] if mode == "pvd_al" else out["ablation"].setdefault(
                    mode, {})
                where[pair] = eval_fn(trainer, params)
    return out


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            scene = sc.make_scene(config.seed, config.data.n_discs)
            dd = config.data
            rays = {"train": sc.views(dd.train_views, dd.rays),
                    "test": sc.views(dd.test_views, dd.rays, phase=0.5),
                    "pool": sc.views(dd.pool_views, dd.rays, phase=0.25)}
            truth = jax.jit(lambda a, o: sc.render(lambda p: sc.scene_field(scene, p), a, o,
                                                   dd.n_samples))
            targets = {k: np.asarray(truth(*v)) for k, v in rays.items()}

        def eval_fn(trainer, params):
            return sc.psnr(trainer.render(params, rays["test"]), targets["test"])

        per_seed, trainers = [], Trainers(config)
        for seed in kit.train_seeds(config):
            with r.phase("seed"):
                per_seed.append(run_seed(config, trainers, seed, rays, targets, eval_fn))
        results = {"per_seed": per_seed, "summary": kit.aggregate(per_seed),
                   "blank_psnr": sc.psnr(0 * targets["test"], targets["test"])}
        with r.phase("report"):
            report.figure(r, results)
            r.write_results(results)
            r.write_report(report.markdown(config, results, r.timings))
