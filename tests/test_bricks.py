"""Bricks: frequencies and specialization on hand-built activations, recovery of a planted
partition, partition ablation against direct ablation runs, bad input, and the smoke
preset."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import Decoder, DecoderConfig
from sklearn.metrics import adjusted_rand_score
from test_decoder import random_params

from mechinterp import bricks, cli
from mechinterp.ablation import ablate
from mechinterp.site_io import capture
from mechinterp.experiments.kit.lm import logits_of
from mechinterp.metrics import accuracy


def test_frequencies_and_specialization_on_hand_built_activations():
    # 4 tokens per task, 1 layer, 3 neurons: neuron 0 fires on task a, neuron 1 on task b,
    # neuron 2 on both half the time.
    a = np.array([[5, 0, 5], [5, 0, 0], [5, 0, 5], [5, 0, 0]], np.float32)[:, None, :]
    b = np.array([[0, 5, 5], [0, 5, 0], [0, 5, 5], [0, 5, 0]], np.float32)[:, None, :]
    tau = bricks.thresholds({"a": a, "b": b}, quantile=0.5)
    assert tau.shape == (1,) and 0 <= tau[0] < 5
    freq = bricks.frequencies({"a": a, "b": b}, tau)
    np.testing.assert_array_equal(freq, [[1, 0, 0.5], [0, 1, 0.5]])
    np.testing.assert_array_equal(bricks.specialization(freq), [[1, -1, 0], [-1, 1, 0]])
    three = np.array([[0.9, 0.1], [0.3, 0.4], [0.0, 0.4]])
    np.testing.assert_allclose(bricks.specialization(three)[:, 0], [0.75, -0.15, -0.6])


def test_kmeans_recovers_a_planted_partition():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), [5, 7, 4])  # 16 neurons in 3 groups
    driver = rng.random((300, 3)) < 0.5  # each group fires with its own token pattern
    active = driver[:, groups] ^ (rng.random((300, 16)) < 0.05)  # 5% flipped bits
    labels = bricks.coactivation_partitions(active, k=3, seed=0)
    assert adjusted_rand_score(groups, labels) == 1.0


@pytest.fixture(scope="module")
def decoder():
    config = DecoderConfig(vocab_size=24, d_model=16, n_layers=2, n_heads=2, d_mlp=8)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 24, (6, 5)), jnp.int32)
    model = Decoder(config)
    return model, random_params(model, tokens), tokens


def test_neuron_activations_are_the_masked_absolute_site(decoder):
    model, params, tokens = decoder
    mask = np.zeros(tokens.shape, bool)
    mask[:, 2:] = True
    got = bricks.neuron_activations(model, params, tokens, mask, batch_size=3)
    _, acts = capture(model, params, tokens, sites=["mlp.hidden"])
    want = np.abs(np.asarray(acts["mlp.hidden"]))[:, :, 2:]  # (layer, batch, pos, d_mlp)
    # the model runs on batches of 3 rows here and of 6 in capture: float32 rounding
    np.testing.assert_allclose(got, want.reshape(2, -1, 8).swapaxes(0, 1), rtol=1e-5,
                               atol=1e-7)


def test_partition_ablation_matches_direct_ablation_runs(decoder):
    model, params, tokens = decoder
    answers = np.asarray(logits_of(model, params, tokens))[:, -1].argmax(-1)
    tasks = {"t0": tokens[:3], "t1": tokens[3:]}
    metrics = {"t0": accuracy(answers[:3]), "t1": accuracy(answers[3:])}
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2, 0, 0, 1, 2, 2])  # 16 neurons
    study = bricks.partition_ablation(model, params, tasks, metrics, labels, d_mlp=8,
                                      n_random=2, seed=3)
    assert study["drop"].shape == (2, 3) and study["random_drop"].shape == (2, 3, 2)
    np.testing.assert_array_equal(study["sizes"], [5, 5, 6])
    np.testing.assert_array_equal(study["base"], [1.0, 1.0])
    for t, name in enumerate(tasks):
        for p in range(3):
            components = bricks.neuron_set(np.flatnonzero(labels == p), 8)
            logits = ablate(model, params, tasks[name], components=components)
            assert study["ablated"][t, p] == pytest.approx(float(metrics[name](logits)))
    with pytest.raises(ValueError, match="must name the same tasks"):
        bricks.partition_ablation(model, params, tasks, {"t0": metrics["t0"]}, labels, 8)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="1 <= k <= 4 neurons"):
        bricks.coactivation_partitions(np.ones((3, 4), bool), k=5)
    with pytest.raises(ValueError, match="tokens > 0"):
        bricks.coactivation_partitions(np.ones((0, 4), bool), k=2)
    with pytest.raises(ValueError, match="compares tasks"):
        bricks.specialization(np.ones((1, 4)))
    with pytest.raises(ValueError, match="quantile must be in"):
        bricks.thresholds({"a": np.ones((2, 1, 3))}, quantile=1.0)


@pytest.mark.slow
def test_smoke_preset_runs_from_the_cli(smoke_run):
    workdir = smoke_run("bricks")  # one CLI run per session, shared with test_configs_smoke
    report = (workdir / "report.md").read_text()
    assert "## Partition ablation" in report and "## Against the expectation" in report
    assert {p.name for p in workdir.glob("*.png")} == {"frequencies.png", "ablation.png"}
    assert "| paper's claim | ours | reproduced? |" in report
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == [0] and len(results["per_seed"]) == 1
    assert results["summary"]["n_partitions"]["values"] == [3]
    assert json.loads((workdir / "run.json").read_text())["status"] == "complete"


def test_presets_come_from_the_config_file():
    smoke = cli.load_config("configs/bricks.py", "smoke")
    assert smoke.preset == "smoke" and smoke.seeds == 1 and smoke.model.n_layers == 2
    assert cli.load_config("configs/bricks.py").analysis.n_partitions == 8
    with pytest.raises(ValueError, match="known presets: default, smoke"):
        cli.load_config("configs/bricks.py", "paper")
