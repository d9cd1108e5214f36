"""The recall-vs-reasoning experiment: puzzles with corrupted twins, the circuit rule,
patching cells against the TransformerLens-named grid, and an end-to-end smoke run."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import Decoder, DecoderConfig

from mechinterp import cli
from mechinterp.experiments import kit
from mechinterp.experiments import recall_reasoning as rr
from mechinterp.experiments.recall_reasoning import puzzles
from mechinterp.metrics import logit_diff
from mechinterp.patching import get_act_patch_resid_pre, normalized_effect
from test_decoder import random_params


def _smoke_config():
    return cli.load_config("configs/recall_reasoning.py", "smoke")


@pytest.mark.parametrize("task", rr.TASKS)
def test_twins_are_deterministic_and_differ_in_one_token_and_the_answer(task):
    config = _smoke_config()
    mixture = rr.make_mixture(config)
    tokenizer, table = mixture.tokenizer(), mixture.knowledge.table(mixture.seed)
    twins = rr.make_twins(mixture, task, "test", 24, seed=3)
    again = rr.make_twins(mixture, task, "test", 24, seed=3)
    for field in ("clean", "corrupt", "clean_answer", "corrupt_answer", "changed"):
        np.testing.assert_array_equal(getattr(twins, field), getattr(again, field))
    other = rr.make_twins(mixture, task, "test", 24, seed=4)
    assert not np.array_equal(twins.clean, other.clean)

    differs = twins.clean != twins.corrupt
    assert (differs.sum(1) == 1).all()
    np.testing.assert_array_equal(differs.argmax(1), twins.changed)
    assert (twins.clean_answer != twins.corrupt_answer).all()
    for row, answer in zip(twins.clean, twins.clean_answer, strict=True):  # the answer is right
        words = tokenizer.decode(row).split()
        if task == "recall":
            e, r = int(words[2][1:]), int(words[3][1:])
            assert f"e{table[e, r]}" == tokenizer.decode([answer])
        else:
            q = words.index("?")
            edges = dict(zip(words[2:q:4], words[4:q:4]))
            symbol = words[q + 1]
            for _ in range(config.data.chain_length - 1):
                symbol = edges[symbol]
            assert symbol == tokenizer.decode([answer])
            assert words[q + 3:] == [] or config.data.scratchpad


def test_reasoning_test_items_use_held_out_premise_combinations():
    config = _smoke_config()
    mixture = rr.make_mixture(config)
    chain = puzzles._task(mixture, "chain")
    held = chain.held_out(mixture.seed)
    assert held.any() and not held.all()
    tokenizer = mixture.tokenizer()
    for split, expected in (("test", True), ("train", False)):
        twins = rr.make_twins(mixture, "reasoning", split, 16, seed=0)
        for row, answer in zip(twins.clean, twins.clean_answer, strict=True):
            words = tokenizer.decode(row).split()
            start = int(words[words.index("?") + 1][1:])
            end = int(tokenizer.decode([answer])[1:])
            assert held[start, end] == expected


def test_circuit_rule_smallest_k_covering_the_positive_effect_capped():
    effects = np.array([[0.05, 0.5, -0.3], [0.3, 0.1, 0.05]])  # positive total 1.0
    np.testing.assert_array_equal(rr.select_circuit(effects, 0.8, 10), [1, 3])
    np.testing.assert_array_equal(rr.select_circuit(effects, 0.85, 10), [1, 3, 4])
    np.testing.assert_array_equal(rr.select_circuit(effects, 0.95, 2), [1, 3])  # cap
    np.testing.assert_array_equal(rr.select_circuit(-np.ones(4), 0.8, 3), [0])  # >= 1


def test_patching_cells_equal_the_transformerlens_named_grid():
    config = _smoke_config()
    mixture = rr.make_mixture(config)
    twins = rr.make_twins(mixture, "reasoning", "test", 8, seed=0)
    model = Decoder(DecoderConfig(vocab_size=mixture.tokenizer().vocab_size, d_model=16,
                                  n_layers=2, n_heads=2, d_mlp=16))
    # random weights (no init compile); seed 1 gives a clean-corrupt logit-diff gap of 0.09,
    # so the normalized effects stay well conditioned
    params = random_params(model, jnp.asarray(twins.clean), seed=1)
    result = rr.patch_task(model, params, twins)
    from mechinterp import capture
    metric = logit_diff(twins.clean_answer, twins.corrupt_answer, pos=-1)
    _, cache = capture(model, params, jnp.asarray(twins.clean), sites=["resid_pre"])
    grid = get_act_patch_resid_pre(model, params, jnp.asarray(twins.corrupt), cache, metric,
                                   progress=False)
    expected = normalized_effect(grid.values, result["m_clean"], result["m_corrupt"])
    np.testing.assert_allclose(result["grids"]["resid_pre"], expected, rtol=1e-4, atol=1e-4)
    assert result["grids"]["neurons"].shape == (2, 16)
    assert result["grids"]["heads"].shape == (2, 2)


def test_smoke_preset_end_to_end(smoke_run):
    workdir = smoke_run("recall_reasoning")  # shared with tests/test_configs_smoke.py
    report = (workdir / "report.md").read_text()
    assert "## Dissociation" in report and "own-task drop" in report
    assert "## Accuracies" in report and "| paper's claim | ours | reproduced? |" in report
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == [0]  # the smoke preset trains one family, one seed
    for family in ("llama",):
        assert (workdir / f"patching_{family}_recall.png").stat().st_size > 0
        assert (workdir / "models" / family / "seed0" / "checkpoints").is_dir()
        rows = results["per_seed"][family][0]["dissociation"]
        assert len(rows) == 2 * 2 * 2  # methods x levels x circuits
        assert all(math.isfinite(v) for r in rows for v in r.values()
                   if isinstance(v, float))
        agg = results["families"][family]["dissociation"]
        assert [a["own_drop"]["values"] for a in agg] == [[r["own_drop"]] for r in rows]
    arrays = np.load(workdir / "results.npz")
    assert all(np.isfinite(arrays[k]).all() for k in arrays.files)
    assert (workdir / "dissociation.png").exists()
    assert json.loads((workdir / "run.json").read_text())["status"] == "complete"


def test_presets_default_and_paper():
    config = cli.load_config("configs/recall_reasoning.py")
    assert (config.preset, config.seeds, config.families) == ("default", 3, "llama,qwen")
    assert config.checkpoint == ""  # the default trains tiny models
    paper = cli.load_config("configs/recall_reasoning.py", "paper")
    assert (paper.checkpoint, paper.preset) == ("smollm2", "paper")
    assert "neurons" in paper.analysis.estimated_grids  # 30 x 1536 cells: not one by one
    assert "neurons" not in paper.analysis.grids


def test_seed_aggregation_of_dissociation_rows():
    """Several seeds' rows aggregate into per-field mean ± sd; the claims table counts the
    seeds in which the dissociation holds."""
    from mechinterp.experiments.recall_reasoning.report import claims

    def rows(rec_sel, rea_sel):
        out = []
        for method in ("zero",):
            for level in ("head/layer", "neuron"):
                for task, sel in (("recall", rec_sel), ("reasoning", rea_sel)):
                    out.append({"method": method, "level": level, "circuit": task, "k": 2,
                                "own_drop": 0.3, "other_drop": 0.3 - sel, "selectivity": sel,
                                "random_own_drop": 0.0, "random_own_sd": 0.05})
        return out
    per_seed = [{"dissociation": rows(0.2, 0.1)}, {"dissociation": rows(0.2, -0.1)}]
    results = {"per_seed": {"llama": per_seed},
               "families": {"llama": kit.aggregate(per_seed)}}
    found = claims(results)
    head = next(c for c in found if "head/layer" in c.claim)
    assert head.reproduced is False and head.note.startswith("1/2 seeds")
    agg = results["families"]["llama"]["dissociation"][1]["selectivity"]
    assert (agg["mean"], agg["values"]) == (0.0, [0.1, -0.1])
