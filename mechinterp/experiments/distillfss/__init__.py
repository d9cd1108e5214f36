"""DistillFSS (cross-domain few-shot segmentation distilled into a support-free student),
small: per training seed a support-conditioned teacher (:mod:`mechinterp.models.fewshot_seg`)
is trained on episodes of the synthetic source domain (:mod:`mechinterp.train.fewshot_seg`);
then for every target domain, class, shot count and draw of shots: the teacher with the
shots as supports, the student distilled from the teacher's predictions on augmented shots
(no supports at test time), the student fine-tuned on the shots' masks, and a linear
head + encoder fine-tuned on the shots only; mIoU per domain and shots, and the test-time
FLOPs (XLA cost analysis) and seconds per query.
"""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.distillfss import report
from mechinterp.experiments.distillfss.specialize import (Specializer, miou, test_time_cost,
                                                          train_teacher)
from mechinterp.train import fewshot_seg

PREDICTORS = ("teacher", "student_init", "student", "student_ft", "baseline_ft")


def evaluate_seed(config, pools, seed: int, r) -> dict:
    """One training seed: teacher training, then every specialization; mIoU per domain
    and shot count, the losses' last values and the test-time cost."""
    with r.phase("train/teacher"):
        teacher, params, losses = train_teacher(config, pools["source", "train"], seed)
    spec = Specializer(config, teacher, params)
    counts = {}
    last = None
    for d, domain in enumerate(config.domains):
        train_x, train_m = pools[domain, "train"]
        test_x, test_m = pools[domain, "test"]
        for k in config.specialize.shots:
            with r.phase(f"specialize/{k}shot"):
                for cls in range(train_x.shape[0]):
                    for draw in range(config.specialize.draws):
                        rng = np.random.default_rng([seed, d, cls, k, draw])
                        pick = rng.permutation(train_x.shape[1])[:k]
                        out, _, last = spec.run(train_x[cls, pick], train_m[cls, pick],
                                                test_x[cls], test_m[cls], rng)
                        for name, c in out.items():
                            counts.setdefault((domain, k, name), {}).setdefault(cls, []).append(c)
    miou_table = {domain: {f"{k}shot": {name: miou(counts[domain, k, name])
                                        for name in PREDICTORS}
                           for k in config.specialize.shots} for domain in config.domains}
    with r.phase("cost"):
        x, m = pools[config.domains[0], "train"]
        shots_by_k = {k: (x[0, :k], m[0, :k]) for k in config.specialize.shots}
        queries = pools[config.domains[0], "test"][0][0][:config.cost.queries]
        cost = test_time_cost(config, spec, *last, queries, shots_by_k)
    return {"miou": miou_table, "teacher_final_loss": float(losses[-10:].mean()),
            "cost": cost}


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            d = config.data
            pools = {(domain, split): fewshot_seg.make_pool(
                domain, size=d.size, per_class=d.per_class if split == "train" else d.n_test,
                split=split, seed=config.seed)
                for domain in ("source",) + tuple(config.domains) for split in ("train", "test")}
        per_seed = [evaluate_seed(config, pools, seed, r) for seed in kit.train_seeds(config)]
        summary = kit.aggregate(per_seed)
        with r.phase("report"):
            report.figure(r, config, summary)
            r.write_results({"per_seed": per_seed, "summary": summary})
            r.write_report(report.markdown(config, summary, r.timings))
