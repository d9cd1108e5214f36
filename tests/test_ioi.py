"""The IOI study (configs/ioi.py): its dataset builder on SmolLM2's own tokenizer, and the
smoke run (SmolLM2 cut to 2 blocks) read through the shared ``smoke_run`` fixture."""

import json

import numpy as np
import pytest

from mechinterp.experiments.ioi import dataset


def test_every_name_is_one_token_with_a_leading_space(smollm2_lm):
    ids = dataset.check_names(smollm2_lm, dataset.NAMES)
    raw = smollm2_lm.tokenizer
    assert ids == [raw.encode(" " + n, add_special_tokens=False).ids[0] for n in dataset.NAMES]
    assert all(len(raw.encode(" " + n, add_special_tokens=False).ids) == 1
               for n in dataset.NAMES)
    assert len(set(ids)) == len(dataset.NAMES)
    with pytest.raises(ValueError, match=r"not: \{'Xanthippe': \[' X'"):
        dataset.check_names(smollm2_lm, ["Mary", "Xanthippe"])


@pytest.mark.parametrize("template", dataset.TEMPLATES)
def test_clean_and_abc_prompts_align_token_for_token(smollm2_lm, template):
    batch = dataset.build(smollm2_lm, template, dataset.NAMES, n_pairs=3, seed=1)
    raw = smollm2_lm.tokenizer
    assert batch.tokens.shape == batch.corrupted_tokens.shape == (6, batch.tokens.shape[1])
    for i, (clean, corrupted) in enumerate(zip(batch.clean, batch.corrupted)):
        a, b = (raw.encode(t, add_special_tokens=False).ids for t in (clean, corrupted))
        assert len(a) == len(b) and list(batch.tokens[i]) == a
        assert list(batch.corrupted_tokens[i]) == b
        differ = np.flatnonzero(batch.tokens[i] != batch.corrupted_tokens[i])
        assert list(differ) == [batch.positions["S2"][i]]  # only S2 -> C
        row, pos = batch.tokens[i], {k: v[i] for k, v in batch.positions.items()}
        assert row[pos["IO"]] == batch.io[i] and row[pos["S1"]] == row[pos["S2"]] == batch.s[i]
        assert pos["S1+1"] == pos["S1"] + 1 and pos["END"] == len(row) - 1
        assert batch.corrupted_tokens[i][pos["S2"]] not in (batch.io[i], batch.s[i])
    # ABBA then BABA: IO first in even prompts, S first in odd ones
    assert (batch.positions["IO"][0::2] < batch.positions["S1"][0::2]).all()
    assert (batch.positions["IO"][1::2] > batch.positions["S1"][1::2]).all()


def test_a_misaligned_pair_names_the_pair_and_the_token_counts(smollm2_lm):
    template = "When {A} and {B} went to the store, {S} gave a drink to"
    with pytest.raises(ValueError, match=r"pair 1: clean .* has 14 tokens .* corrupted .* has "
                                         r"17 .*differ by 3 tokens\)"):
        dataset.align(smollm2_lm, [template.format(A="Mary", B="John", S=s) for s in
                                     ("John", "John")],
                      [template.format(A="Mary", B="John", S=s) for s in ("Tom", "Xanthippe")])


def test_the_smoke_run_reports_every_analysis(smoke_run, smollm2_gguf):
    workdir = smoke_run("ioi")
    results = json.loads((workdir / "results.json").read_text())
    assert results["n_layers"] == 2 and results["n_heads"] == 9
    for t in results["templates"]:
        assert t["dla_check"] <= 1e-3  # the per-component DLA sums to the logit difference
        assert 0.0 <= t["accuracy"] <= 1.0
    with np.load(workdir / "results.npz") as arrays:
        str_tokens = results["grid_str_tokens"][0]
        assert arrays["resid_pre_t0"].shape == arrays["attn_out_t0"].shape == (2, len(str_tokens))
        assert arrays["heads_t0"].shape == (2, 9)
        # clean and ABC prompts differ only at S2: restoring the stream entering layer 0
        # there restores the clean run (1), anywhere else it changes nothing (0)
        s2 = results["grid_positions"][0]["S2"]
        assert len(set(s2)) == 1  # one template: S2 at one position
        resid = arrays["resid_pre_t0"][0]
        np.testing.assert_allclose(resid[s2[0]], 1.0, atol=0.02)
        np.testing.assert_allclose(np.delete(resid, s2[0]), 0.0, atol=0.02)
        # only the candidate heads were path-patched
        chosen = np.zeros((2, 9), bool)
        chosen[tuple(np.array(results["candidates"]["direct"]).T)] = True
        assert np.isfinite(arrays["direct"][chosen]).all()
        assert np.isnan(arrays["direct"][~chosen]).all()
    for name in ("patching_positions.png", "heads.png"):
        assert (workdir / name).stat().st_size > 0
    assert "No training seeds" in (workdir / "report.md").read_text()
