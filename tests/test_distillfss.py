"""DistillFSS: few-shot domains, the teacher / student family, mIoU, and the smoke run."""

import inspect
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from sklearn.metrics import jaccard_score

import mechinterp
from mechinterp.experiments.distillfss.specialize import iou_counts, miou
from mechinterp.models.fewshot_seg import (FSSStudent, FSSTeacher, LinearSegmenter,
                                           student_from_support)
from mechinterp.train import fewshot_seg

SITES_DOC = Path(__file__).resolve().parents[1] / "docs" / "sites.md"


@pytest.fixture(scope="module")
def tiny():
    """A tiny untrained teacher, its params and one 2-shot episode of the medical domain."""
    images, masks = fewshot_seg.make_pool("medical", size=16, per_class=4)
    ep = fewshot_seg.episodes(images, masks, batch=2, shots=2, rng=np.random.default_rng(0))
    teacher = FSSTeacher(width=8, n_layers=1, hidden=4)
    params = teacher.init(jax.random.key(0), ep["query"], ep["support"],
                          ep["support_mask"])["params"]
    return teacher, params, ep


def test_pools_are_deterministic_and_masks_hold_their_class():
    a = fewshot_seg.make_pool("remote", size=16, per_class=3, split="test", seed=4)
    b = fewshot_seg.make_pool("remote", size=16, per_class=3, split="test", seed=4)
    c = fewshot_seg.make_pool("remote", size=16, per_class=3, split="train", seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    for domain in fewshot_seg.DOMAINS:
        images, masks = fewshot_seg.make_pool(domain, size=16, per_class=3)
        assert images.shape == (3, 3, 16, 16, 3) and 0 <= images.min() <= images.max() <= 1
        fraction = masks.mean(axis=(2, 3))
        assert (fraction > 0.01).all() and (fraction < 0.5).all(), domain
    names = [set(v) for v in fewshot_seg.DOMAINS.values()]
    assert sum(len(n) for n in names) == len(set().union(*names))  # disjoint label spaces
    with pytest.raises(ValueError, match="unknown few-shot domain 'xray'"):
        fewshot_seg.make_pool("xray")


def test_miou_matches_sklearn_jaccard():
    rng = np.random.default_rng(0)
    counts, reference = {}, []
    for cls in range(3):
        logits = rng.normal(size=(4, 8, 8)) + cls * 0.3
        truth = rng.uniform(size=(4, 8, 8)) < 0.3 + 0.1 * cls
        counts[cls] = [iou_counts(logits[i], truth[i]) for i in range(4)]
        reference.append(jaccard_score(truth.ravel(), (logits > 0).ravel()))
    assert miou(counts) == pytest.approx(np.mean(reference), abs=1e-12)


def test_teacher_prototypes_are_masked_feature_averages(tiny):
    teacher, params, ep = tiny
    _, cache = mechinterp.capture(teacher, params, ep["query"], ep["support"],
                                  ep["support_mask"], sites=["features", "prototypes"])
    feats = np.asarray(cache["features"], np.float64)[2:].reshape(2, 2, 8, 8, 8)
    m = ep["support_mask"].reshape(2, 2, 8, 2, 8, 2).mean(axis=(3, 5))[..., None]
    fg = (feats * m).sum((1, 2, 3)) / m.sum((1, 2, 3))
    bg = (feats * (1 - m)).sum((1, 2, 3)) / (1 - m).sum((1, 2, 3))
    np.testing.assert_allclose(cache["prototypes"], np.stack([fg, bg], 1), atol=1e-5)


def test_student_needs_no_supports_at_test_time(tiny):
    teacher, params, ep = tiny
    assert list(inspect.signature(FSSStudent.__call__).parameters) == ["self", "images"]
    shots, shot_masks = ep["support"][0].copy(), ep["support_mask"][0].copy()
    student, sparams = student_from_support(teacher, params, shots, shot_masks, n_keys=4)
    before = np.asarray(student.apply({"params": sparams}, ep["query"]))
    teacher_before = np.asarray(teacher.apply({"params": params}, ep["query"][:1],
                                              shots[None], shot_masks[None]))
    shots[:] = np.random.default_rng(1).uniform(size=shots.shape)  # the support data change
    shot_masks[:] = ~shot_masks
    after = np.asarray(student.apply({"params": sparams}, ep["query"]))
    teacher_after = np.asarray(teacher.apply({"params": params}, ep["query"][:1],
                                             shots[None], shot_masks[None]))
    np.testing.assert_array_equal(before, after)
    assert np.abs(teacher_after - teacher_before).max() > 1e-4  # the teacher does read them


def test_site_table_matches_the_three_models():
    section = SITES_DOC.read_text().split("## Few-shot segmentation", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
    documented = {name: (axes.strip(), meaning.strip()) for name, axes, meaning in rows}
    declared = {name: (", ".join(spec.axes), spec.meaning)
                for model in (FSSTeacher, FSSStudent, LinearSegmenter)
                for name, spec in model.SITES.items()}
    assert documented == declared


def test_smoke_run_scores_every_predictor_and_the_student_is_cheaper(smoke_run):
    results = json.loads((smoke_run("distillfss") / "results.json").read_text())
    table = results["summary"]["miou"]["medical"]
    for shots in ("1shot", "5shot"):
        for name in ("teacher", "student_init", "student", "student_ft", "baseline_ft"):
            assert 0.0 <= table[shots][name]["mean"] <= 1.0
    flops = {k: v["flops"]["mean"] for k, v in results["summary"]["cost"].items()}
    assert flops["teacher_5shot"] > flops["teacher_1shot"] > flops["student"] > 0
    report = (smoke_run("distillfss") / "report.md").read_text()
    assert "| predictor | XLA MFLOPs | milliseconds (CPU) |" in report
