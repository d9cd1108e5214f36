"""Probe prompting: signatures from hand-built activations, the ordered classification
rules on hand-built signatures, supernodes, baseline scores, transfer rates and the
experiment's entity swaps."""

import dataclasses
import json
import math

import numpy as np
import pytest

from mechinterp import cli
from mechinterp import probe_prompting as P
from mechinterp.experiments import probe_prompting as E

FUNCTION = {"<bos>", "=", "<hop>"}
WORDS = [["<bos>", "<hop>", "e1", "r0", "="],
         ["<bos>", "<hop>", "e2", "r0", "="],
         ["<bos>", "<hop>", "e3", "r1", "="],
         ["<bos>", "<hop>", "e4", "r0", "="]]


def _acts():
    """(probe 4, layer 2, pos 5, feature 3) activations with known signatures."""
    a = np.zeros((4, 2, 5, 3))
    a[:, 0, 3, 0] = [1.0, 2.0, 0.0, 1.5]  # layer 0 f0: peaks on the relation, not probe 2
    a[2, 0, 3, 0] = 0.0
    a[:, 0, 2, 1] = 1.0  # layer 0 f1: always peaks on the entity (4 distinct tokens)
    a[:, 0, :, 1] += 0.1  # ... and is active everywhere (dense)
    a[:, 1, 4, 2] = [3.0, 2.0, 1.0, 0.0]  # layer 1 f2: peaks on "=" in 3 probes
    return a


def test_signatures_from_hand_built_activations():
    sigs = P.signatures(_acts(), WORDS, [(0, 0), (0, 1), (1, 2)], FUNCTION)
    relation, entity, say = sigs
    assert (relation.fires_on, relation.distinct_peaks, relation.modal_peak) == (3, 1, "r0")
    assert relation.peak_consistency == 1.0 and relation.function_share == 0.0
    assert relation.sparsity == pytest.approx(1 - 3 / 20)
    assert entity.distinct_peaks == 4 and entity.peak_consistency == 0.25
    assert entity.sparsity == 0.0
    assert (say.fires_on, say.modal_peak, say.function_share) == (3, "=", 1.0)
    assert say.peak_consistency == 1.0 and say.sparsity == pytest.approx(1 - 3 / 20)


BASE = P.Signature(layer=0, feature=0, peak_consistency=0.5, distinct_peaks=3,
                   function_share=0.0, sparsity=0.9, modal_peak="e1", fires_on=4)


def _sig(**changes):
    return dataclasses.replace(BASE, **changes)


@pytest.mark.parametrize("signature, expected", [
    (_sig(distinct_peaks=1, peak_consistency=1.0, modal_peak="r0", layer=3),
     ("Semantic", "r0", 1)),
    # a single consistent peak on a function word is not rule 1; late -> Say X
    (_sig(distinct_peaks=1, peak_consistency=1.0, modal_peak="=", function_share=1.0,
          layer=3), ("Say X", "say e7", 2)),
    # the same, early in the model: not Say X; sparse; early -> Semantic (concept)
    (_sig(distinct_peaks=1, peak_consistency=1.0, modal_peak="=", function_share=1.0,
          layer=0), ("Semantic", "=", 4)),
    (_sig(function_share=0.75, peak_consistency=0.5, layer=3, sparsity=0.2),
     ("Relationship", "e1", 3)),
    (_sig(layer=1, sparsity=0.9), ("Semantic", "e1", 4)),
    (_sig(layer=3, function_share=0.75, peak_consistency=0.5, sparsity=0.9),
     ("Review", "", 5)),
    (_sig(fires_on=0, peak_consistency=0.0, distinct_peaks=0, modal_peak=""),
     ("Review", "", 5)),
])
def test_rules_fire_in_order(signature, expected):
    assert P.classify(signature, 4, FUNCTION, say_name="e7") == expected


def test_rule_thresholds_are_fields():
    signature = _sig(layer=3, function_share=0.75, peak_consistency=0.5, sparsity=0.6)
    assert P.classify(signature, 4, FUNCTION)[0] == "Review"
    looser = P.Rules(dense_sparsity=0.7)
    assert P.classify(signature, 4, FUNCTION, rules=looser)[0] == "Relationship"


def test_supernodes_group_by_category_and_name():
    labels = [("Semantic", "r0"), ("Say X", "say e7"), ("Semantic", "r0"), ("Review", ""),
              ("Review", ""), ("Semantic", "e1")]
    groups = P.supernodes(labels)
    assert groups[("Semantic", "r0")] == [0, 2]
    assert groups[("Say X", "say e7")] == [1]
    assert len(groups) == 5  # Review features stay alone


def test_group_scores_by_hand():
    peaks = [["r0", "r0", "r0"], ["r0", "e1"], ["e2", "e3"], ["x"]]
    # group {0, 1}: 4 of 5 peaks are r0; group {2, 3}: e2/e3/x -> 1 of 3; singletons skipped
    assert P.group_peak_consistency([[0, 1], [2, 3], [3]], peaks) == pytest.approx(
        (4 / 5 + 1 / 3) / 2)
    profiles = np.array([[1.0, 2, 3, 4], [2.0, 4, 6, 8], [4.0, 3, 2, 1], [1.0, 1, 1, 1]])
    # group {0, 1}: r = 1; group {0, 2}: r = -1; group {1, 3}: constant profile dropped
    assert P.group_profile_similarity([[0, 1], [0, 2], [1, 3]], profiles) == pytest.approx(0.0)


def test_geometric_clusters_split_orthogonal_directions():
    rng = np.random.default_rng(0)
    a, b = np.eye(8)[0], np.eye(8)[1]
    vectors = np.stack([a * 2 + 0.01 * rng.normal(size=8) for _ in range(3)]
                       + [b * 0.5 + 0.01 * rng.normal(size=8) for _ in range(2)])
    clusters = sorted(sorted(int(i) for i in c) for c in P.geometric_clusters(vectors, 2))
    assert clusters == [[0, 1, 2], [3, 4]]


def test_transfer_by_layer():
    original = [(0, 1), (0, 2), (0, 3), (1, 5), (1, 6)]
    swapped = [(0, 1), (0, 3), (1, 7), (2, 0)]
    rates = P.transfer_by_layer(original, swapped, 3)
    assert rates[0] == pytest.approx(2 / 3) and rates[1] == 0.0 and np.isnan(rates[2])


def test_swap_transfer_counts_each_layer_feature_once():
    original = [(0, 1), (0, 2), (0, 1), (2, 5)]  # (0, 1) kept at two positions
    swapped = [(0, 1), (1, 9)]
    t = E.swap_transfer(original, swapped, 3)
    assert t["n_features"] == 3 and t["rate"] == pytest.approx(1 / 3)
    assert t["by_layer"][0] == 0.5 and np.isnan(t["by_layer"][1]) and t["by_layer"][2] == 0.0
    assert t["mean_layer_transferred"] == 0.0 and t["mean_layer_failed"] == 1.0
    assert np.isnan(E.swap_transfer([], swapped, 3)["rate"])


def test_entity_swap_changes_city_state_and_capital():
    mixture = E.make_mixture(cli.load_config("configs/probe_prompting.py"))
    table = mixture.knowledge.table(mixture.seed)
    state = table[:, 0]
    capital = table[state, 1]
    correct = np.ones(len(table), bool)
    for city in range(len(table)):
        swap = E.entity_swap(mixture, city, correct)
        assert swap != city and state[swap] != state[city] and capital[swap] != capital[city]
    first = E.entity_swap(mixture, 0, correct)
    correct[first] = False  # a correctly answered swap is preferred
    second = E.entity_swap(mixture, 0, correct)
    assert second != first and correct[second] and state[second] != state[0]


def test_two_hop_prompts_and_probes_follow_the_knowledge_table():
    mixture = E.make_mixture(cli.load_config("configs/probe_prompting.py", "smoke"))
    table, tokenizer = mixture.knowledge.table(mixture.seed), mixture.tokenizer()
    words, tokens, answers = E.two_hop_prompts(mixture)
    assert tokens.shape == (6, 6) and tokens.dtype == np.int32
    for e, (w, t, a) in enumerate(zip(words, tokens, answers, strict=True)):
        assert w == ["<bos>", "<hop>", f"e{e}", "r0", "r1", "="]
        assert list(t) == list(tokenizer.encode(w))
        assert a == tokenizer.encode([f"e{table[table[e, 0], 1]}"])[0]
    probe_words, probe_tokens = E.probes_for(mixture, 2)
    assert probe_words[:6] == words and len(probe_words) == 6 + 2 * 2 - 1
    assert {tuple(w[2:5]) for w in probe_words[6:]} == {("e2", "r0", "r0"), ("e2", "r1", "r0"),
                                                      ("e2", "r1", "r1")}
    assert probe_tokens.shape == (9, 6)


def test_category_counts_and_bad_probes():
    counts = P.category_counts([("Semantic", "a"), ("Say X", "b"), ("Semantic", "c")],
                               [0, 2, 0], 3)
    assert counts["Semantic"] == [2, 0, 0] and counts["Say X"] == [0, 0, 1]
    with pytest.raises(ValueError, match="n_probes, length"):
        P.probe_activations(None, None, None, None, np.zeros(5, int))


@pytest.mark.slow
def test_the_smoke_preset_runs_end_to_end(smoke_run):
    workdir = smoke_run("probe_prompting")  # one CLI run per session, shared with test_configs_smoke
    report = (workdir / "report.md").read_text()
    assert "| Completeness (mean over 2 prompts) |" in report
    assert "| paper's claim | ours | reproduced? |" in report
    everything = json.loads((workdir / "results.json").read_text())
    assert everything["seeds"] == [0] and len(everything["per_seed"]) == 1
    assert json.loads((workdir / "run.json").read_text())["status"] == "complete"
    results = everything["per_seed"][0]
    seed_dir = workdir / "seed0"
    for graph in results["graphs"]:
        assert 0.0 <= graph["replacement"] <= 1.0 and 0.0 <= graph["completeness"] <= 1.0
        assert sum(graph["n_kept_by_position"]) == graph["n_features_kept"]
        assert graph["n_kept_by_position"][0] == 0  # position 0 (BOS) is no graph node
    assert len(results["agreement"]) == 8  # 2 prompts x 2 features x 2 fractions
    assert [t["city"] for t in results["transfer"]] == results["cities"]
    for t in results["transfer"]:  # each prompt against its own entity-swapped version
        assert t["swap"] != t["city"] and 0.0 <= t["rate"] <= 1.0
        assert len(t["by_layer"]) == 2
        assert (seed_dir / "graphs" / f"prompt_e{t['swap']}.json").exists()
    assert "| entity-swap transfer: share of a circuit's features" in report
    assert "Kept features by position, summed over the prompts' graphs: `<bos>` 0," in report
    assert (seed_dir / "transcoders.npz").stat().st_size > 0
    clean = results["transcoders"]["loss_clean"]
    assert math.isfinite(clean) and clean < 5.0  # scored on answer tokens only
    data = json.loads(next((seed_dir / "graphs").glob("*.json")).read_text())
    assert data["metadata"]["schema"] == "mechinterp.attribution_graph/1"
    assert next((seed_dir / "graphs").glob("*.png")).stat().st_size > 0
