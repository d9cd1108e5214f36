"""``preset=paper`` of the recall-vs-reasoning job: the natural-language twins under the
SmolLM2 tokenizer (equal token lengths, one differing token, answers that follow from the
tables / the premises, clear errors naming the item), attribution-estimated grids and
bootstrap intervals against references, and a real-model smoke run (``paper_smoke``)."""

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from mechinterp.attribution import attribution_patch
from mechinterp.experiments.kit import circuits
from mechinterp.experiments.recall_reasoning import natural, paper
from mechinterp.metrics import logit_diff
from mechinterp.models import Decoder, DecoderConfig
from test_decoder import random_params


def _words_differ(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = re.findall(r"\w+|\S", a), re.findall(r"\w+|\S", b)
    assert len(wa) == len(wb)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


def test_recall_twins_under_the_smollm2_tokenizer(smollm2_lm):
    items = natural.recall_items(smollm2_lm, seed=0)
    assert len(items) == len(natural.COUNTRIES) * len(natural.RECALL_TEMPLATES)
    twins = natural.twins_of(smollm2_lm, "recall", items)
    assert twins.clean.shape == twins.corrupt.shape == (len(items), 6)
    np.testing.assert_array_equal((twins.clean != twins.corrupt).sum(1), 1)
    np.testing.assert_array_equal(twins.changed, 4)  # "The capital city of <X> is"
    assert (twins.clean_answer != twins.corrupt_answer).all()
    for item, row, answer in zip(items, twins.clean, twins.clean_answer):
        relation, pair = item.name.split("/")
        country, twin = pair.split("~")
        _, column = natural.RECALL_TEMPLATES[relation]
        assert _words_differ(item.clean, item.corrupt) == [(country, twin)]
        assert item.clean_answer == " " + natural.COUNTRIES[country][column]
        assert item.corrupt_answer == " " + natural.COUNTRIES[twin][column]
        assert smollm2_lm.to_string(row) == item.clean  # tokens round-trip to the text
        assert item.clean_answer.startswith(smollm2_lm.to_string([int(answer)]))
    assert natural.recall_items(smollm2_lm, seed=0) == items  # deterministic


def test_reasoning_twins_follow_from_their_premises(smollm2_lm):
    items = natural.reasoning_items(24, seed=0, shots=1)
    twins = natural.twins_of(smollm2_lm, "reasoning", items)
    np.testing.assert_array_equal((twins.clean != twins.corrupt).sum(1), 1)
    for item in items:
        query = item.clean.split("\n")[-1]  # the solved example comes first
        where = dict(re.findall(r"(\w+) is in (\w+)", query.rsplit(".", 2)[0]))
        (person, companion), = re.findall(r"(\w+) is with (\w+)\.", query)
        assert query.endswith(f"{person} is in")
        assert item.clean_answer == " " + where[companion]
        (_, other), = _words_differ(item.clean, item.corrupt)
        assert item.corrupt_answer == " " + where[other] != item.clean_answer
        example = item.clean.split("\n")[0]  # the shot is solved correctly too
        shot_where = dict(re.findall(r"(\w+) is in (\w+) and", example)
                          + re.findall(r"and (\w+) is in (\w+)\.", example))
        (_, shot_companion), = re.findall(r"(\w+) is with (\w+)\.", example)
        assert example.endswith(f" is in {shot_where[shot_companion]}.")


def test_twins_of_names_the_item_whose_lengths_differ(smollm2_lm):
    countries = {"France": ("Paris", "French"), "Burkina Faso": ("Ouagadougou", "French"),
                 "Italy": ("Rome", "Italian")}
    items = natural.recall_items(smollm2_lm, countries, {"capital": ("The capital of {} is", 0)})
    with pytest.raises(ValueError, match=r"capital/Burkina Faso~\w+: \d+ tokens .* vs the "
                       r"twin's \d+"):
        natural.twins_of(smollm2_lm, "recall", items)
    multi = natural.Item("reasoning/odd", "Zanzibarina is in Rome.", "Alice is in Rome.",
                         " Rome", " Paris")
    with pytest.raises(ValueError, match="reasoning/odd"):
        natural.twins_of(smollm2_lm, "reasoning", [multi])
    same_answer = natural.Item("recall/same", "The capital of France is",
                               "The capital of Italy is", " Paris", " Paris")
    with pytest.raises(ValueError, match=r"recall/same \(both answers start with ' Paris'\)"):
        natural.twins_of(smollm2_lm, "recall", [same_answer])
    with pytest.raises(ValueError, match="checkpoint='/no/such.gguf' does not exist"):
        paper.checkpoint_path("/no/such.gguf")


def test_estimated_grids_are_attribution_patching():
    """patch_grids' estimated grids (sharing one forward and backward) equal
    attribution_patch's estimates normalized by the clean - corrupted gap."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (4, 6)), jnp.int32)
    corrupt = tokens.at[:, 2].set((tokens[:, 2] + 1) % 32)
    model = Decoder(DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_mlp=16))
    params = random_params(model, tokens, seed=1)
    metric = logit_diff(jnp.arange(4), jnp.arange(4, 8), pos=-1)
    with pytest.raises(ValueError, match="each exact or estimated"):
        circuits.patch_grids(model, params, tokens, corrupt, metric, exact=("heads",),
                             estimated=("heads",))
    out = circuits.patch_grids(model, params, tokens, corrupt, metric, exact=(),
                               estimated=("resid_pre", "neurons", "mlp_out", "mlp_layers"))
    assert out["estimated"] == ["resid_pre", "neurons", "mlp_out", "mlp_layers"]
    from mechinterp import capture
    _, cache = capture(model, params, tokens, sites=["resid_pre", "mlp.hidden", "mlp_out"])
    ref = attribution_patch(model, params, corrupt, cache, metric,
                            {"resid_pre": ("layer", "pos"), "mlp.hidden": ("layer", "d_mlp"),
                             "mlp_out": ("layer", "pos")})
    gap = out["m_clean"] - out["m_corrupt"]
    for grid, site in (("resid_pre", "resid_pre"), ("neurons", "mlp.hidden"),
                       ("mlp_out", "mlp_out")):
        np.testing.assert_allclose(out["grids"][grid], np.asarray(ref[site].values) / gap,
                                   rtol=1e-4, atol=1e-6)
    # mlp_layers (site mlp_out again, other axes) ran in a second call: the per-layer sums
    np.testing.assert_allclose(out["grids"]["mlp_layers"], out["grids"]["mlp_out"].sum(1),
                               rtol=1e-4, atol=1e-6)


def test_bootstrap_intervals_match_scipy():
    """dissociation(n_boot=...) percentile intervals against scipy.stats.bootstrap on the
    same per-item drops (different resamples: agreement to Monte Carlo error)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    layout = [("none", "none", "baseline", -1)]
    for level in circuits.LEVELS:
        for task in ("recall", "reasoning"):
            layout += [(level, task, "circuit", -1), (level, task, "random", 0),
                       (level, task, "random", 1)]
    acc = {("zero", t): (rng.random((len(layout), n)) < p).astype(float)
           for t, n, p in (("recall", 40, 0.6), ("reasoning", 30, 0.4))}
    for t in ("recall", "reasoning"):
        acc["zero", t][0] = 1.0  # unablated: all right
    study = {"layout": layout, "accuracy": acc, "sizes": [0] + [2] * (len(layout) - 1)}
    rows = circuits.dissociation(study, ["zero"], ("recall", "reasoning"), n_boot=4000, seed=0)
    for row in rows:
        idx = layout.index((row["level"], row["circuit"], "circuit", -1))
        own = acc["zero", row["circuit"]][0] - acc["zero", row["circuit"]][idx]
        ref = scipy_stats.bootstrap((own,), np.mean, n_resamples=4000, method="percentile",
                                    random_state=1).confidence_interval
        np.testing.assert_allclose(row["own_ci"], [ref.low, ref.high], atol=0.03)
        assert row["own_ci"][0] <= row["own_drop"] <= row["own_ci"][1]
        assert row["selectivity_ci"][0] <= row["selectivity"] <= row["selectivity_ci"][1]
    assert "own_ci" not in circuits.dissociation(study, ["zero"], ("recall", "reasoning"))[0]


def test_paper_smoke_runs_on_smollm2(smoke_run, smollm2_gguf):
    workdir = smoke_run("recall_reasoning", preset="paper_smoke")
    report = (workdir / "report.md").read_text()
    assert report.startswith("# Recall vs reasoning circuits on a real model: SmolLM2")
    assert "| paper's claim | ours | reproduced? |" in report and "## Items" in report
    results = json.loads((workdir / "results.json").read_text())
    for task, n in (("recall", 8), ("reasoning", 36)):
        v = results["items"][task]
        assert 1 <= v["kept"] <= v["solved"] <= v["candidates"] == n
        assert v["solved"] / v["candidates"] == pytest.approx(v["accuracy_both"])
        assert v["accuracy_both"] <= min(v["accuracy_clean"], v["accuracy_twin"])
    assert results["items"]["recall"]["accuracy_clean"] >= 0.75  # it knows capitals
    assert results["items"]["reasoning"]["forced_choice_both"] <= 0.25  # ... not binding
    assert "The model fails the reasoning task" in report
    assert results["analysed_tasks"] == ["recall", "reasoning"]
    analysis = results["analysis"]
    rows = analysis["dissociation"]  # 1 method x 2 levels x 2 circuits, with intervals
    assert len(rows) == 4 and all(r["own_ci"][0] <= r["own_drop"] <= r["own_ci"][1]
                                  for r in rows)
    assert analysis["logit_diff"]["recall"]["clean"] > 0 > analysis["logit_diff"]["recall"][
        "corrupt"]
    arrays = np.load(workdir / "results.npz")
    assert arrays["recall/heads"].shape == (30, 9)
    assert arrays["recall/neurons"].shape == (30, 1536)
    assert all(np.isfinite(arrays[k]).all() for k in arrays.files)
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    assert json.loads((workdir / "run.json").read_text())["status"] == "complete"


def test_report_says_when_the_model_solves_nothing():
    from mechinterp import cli

    config = cli.load_config("configs/recall_reasoning.py", "paper")
    task = {"candidates": 10, "solved": 0, "kept": 0, "kept_items": [], "tokens": 6,
            "accuracy_clean": 0.3, "accuracy_twin": 0.2, "accuracy_both": 0.0,
            "logit_diff_clean": 0.1, "logit_diff_twin": 0.1, "forced_choice_both": 0.1,
            "example": ["a", " b", "c", " d"]}
    results = {"model": "M", "checkpoint": "m.gguf", "analysed_tasks": [],
               "items": {"recall": dict(task, forced_choice_both=0.9), "reasoning": task}}
    report = paper.paper_report(config, results, {"total": 1.0})
    assert "not testable: the model solves too few recall, reasoning items" in report
    assert "**The model fails the reasoning task**" in report
    assert "The model fails the recall task" not in report  # 90 % forced choice: it knows
    assert "recall: only 0 pairs solved" in report and "Nothing to analyse." in report
