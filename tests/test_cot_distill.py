"""CoT distillation: the per-token KL objective against a float64 reference, the final
answer parser, and what the smoke run's report and results hold."""

import json

import numpy as np
import pytest

from mechinterp.experiments.cot_distill.data import final_answer
from mechinterp.train.token_distill import distill_objective, token_kl


def _reference(logits, teacher_logits, tokens, mask, alpha):
    """(1 - alpha) NLL + alpha KL(teacher || student), summed over targets, in float64."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    log_s, log_t = log_softmax(logits[:, :-1]), log_softmax(teacher_logits[:, :-1])
    targets, m = tokens[:, 1:], mask[:, 1:]
    nll = -np.take_along_axis(log_s, targets[..., None], -1)[..., 0]
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
    return ((1 - alpha) * nll + alpha * kl) * m


def test_distill_loss_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    logits, teacher = rng.normal(size=(2, 2, 6, 7)) * 3
    tokens = rng.integers(0, 7, (2, 6))
    mask = (rng.random((2, 6)) < 0.6).astype(np.int32)
    log_t = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    batch = {"tokens": tokens, "loss_mask": mask, "teacher_logprobs": log_t.astype(np.float32)}
    terms = distill_objective(0.3).terms(logits.astype(np.float32), batch)
    want = _reference(logits, teacher, tokens, mask, 0.3)
    np.testing.assert_allclose(float(terms["loss"]), want.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(terms["weight"]), mask[:, 1:].sum())
    # the student equal to the teacher has zero KL
    np.testing.assert_allclose(np.asarray(token_kl(log_t, log_t)), 0.0, atol=1e-5)


def test_distill_objective_names_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        distill_objective(1.5)
    batch = {"tokens": np.zeros((1, 4), np.int32), "loss_mask": np.ones((1, 4), np.int32),
             "teacher_logprobs": np.zeros((1, 4, 3), np.float32)}
    with pytest.raises(ValueError, match="teacher_logprobs has shape"):
        distill_objective(0.5).terms(np.zeros((1, 4, 5), np.float32), batch)


def test_final_answer_reads_the_last_total_of_either_format():
    assert final_answer("8 ; 1 3 ; - 2 <eos> 5".split()) == ["-", "2"]
    assert final_answer(["1", "7", "<eos>"]) == ["1", "7"]
    assert final_answer(["4"]) == ["4"]


def test_smoke_run_scores_every_student_in_range(smoke_run):
    workdir = smoke_run("cot_distill")
    results = json.loads((workdir / "results.json").read_text())
    row = results["per_seed"][0]
    assert set(row) == {"base", "answer_only", "cot", "cot_kl"}
    for scores in row.values():
        for value in (*scores["arithmetic"].values(), *scores["generic"].values()):
            if not isinstance(value, str):
                assert 0.0 <= value <= 1.0
    report = (workdir / "report.md").read_text()
    assert "Specialization costs generic ability" in report and "per-token KL" in report
    # same base, data order and seed: only the KL term tells the two students' losses apart
    def last_loss(variant):
        lines = (workdir / f"models/seed0/{variant}/metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["loss"]
    assert abs(last_loss("cot_kl") - last_loss("cot")) > 1e-4
