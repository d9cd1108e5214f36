"""Self-Specialization (configs/self_specialization.py): filtering, retrieval, the KV-cache
sampler and the smoke run on a one-layer SmolLM2 (real tokenizer and embeddings)."""

import importlib
import itertools
import json
import math

import jax
import numpy as np
import pytest

from mechinterp.experiments.self_specialization import data, filtering, pipeline


def _lcs_brute(a, b):
    """Longest common subsequence by enumerating the subsequences of ``a`` (reference)."""
    for size in range(len(a), 0, -1):
        for idx in itertools.combinations(range(len(a)), size):
            it = iter(b)
            if all(a[i] in it for i in idx):
                return size
    return 0


def test_rouge_l_is_the_lcs_f1_against_brute_force():
    assert filtering.rouge_l("the cat sat on the mat", "the cat lay on the mat") == \
        pytest.approx(5 / 6)
    assert filtering.rouge_l("a b c d", "a c") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert filtering.rouge_l("x y", "z") == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = (list(rng.choice(list("abcd"), rng.integers(1, 8))) for _ in range(2))
        lcs = _lcs_brute(a, b)
        p, r = lcs / len(a), lcs / len(b)
        want = 0.0 if lcs == 0 else 2 * p * r / (p + r)
        assert filtering.rouge_l(" ".join(a), " ".join(b)) == pytest.approx(want)
    # content words only: the shared question template does not count
    assert filtering.rouge_l("What does `os.getpid` do?", "What does `os.getcwd` do?", True) \
        == pytest.approx(0.5)


def test_filter_drops_duplicates_malformed_and_near_copies_of_seeds():
    ok = ("What does `gzip.compress` do?", "Compress data in one shot.")
    pairs = [
        ok,
        ("what does `gzip.compress` do ?", "Another answer here."),          # duplicate
        ("Tell me about gzip", "Compress data in one shot."),                # no question
        ("What is\nthis?", "Two lines of text here."),                       # two lines
        ("Q: What does `zlib.crc32` do?", "Compute a checksum of data."),    # marker left
        ("What does `shlex.split` do?", "Split a string <|im_end|> here."),  # marker in answer
        ("What does `shlex.quote` do?", "Return a shell-escaped version of"),  # unfinished
        ("What does `glob.glob` do?", " ".join(["word"] * 50) + "."),        # answer too long
        ("What?", "A short but complete answer."),                           # too short
        ("What does `json.loads` do exactly?", "Parse JSON text."),          # ~ a seed
        ("What does `html.escape` do?", ""),                                 # empty answer
    ]
    kept, dropped = filtering.filter_pairs(pairs, [q for q, _ in data.SEEDS], max_rouge=0.7)
    assert kept == [ok]
    assert dropped == {"duplicate": 1, "format": 5, "length": 2, "similar": 1, "empty": 1}
    assert filtering.filter_pairs([ok], [], max_rouge=0.7)[1] == dict.fromkeys(
        filtering.REASONS, 0)  # every reason listed: seeds aggregate key by key
    assert sum(dropped.values()) + len(kept) == len(pairs)


def test_corpus_seeds_and_held_out_modules_are_disjoint_and_retrieval_is_lexical():
    corpus = data.documented(data.RETRIEVAL_MODULES)
    held_out = data.documented(data.EVAL_MODULES)
    module = lambda name: name.rsplit(".", 1)[0]  # noqa: E731
    seed_modules = {module(q.split("`")[1]) for q, _ in data.SEEDS}
    assert not {module(p.name) for p in held_out} & ({module(p.name) for p in corpus}
                                                     | seed_modules)
    assert len(corpus) > 100 and len(held_out) > 50
    assert data.retrieve("What does `os.path.join` do?", corpus)[0].name == "os.path.join"
    assert data.retrieve("How do I gzip-compress bytes?", corpus, 2)[0].name.startswith(
        ("gzip.", "zlib."))
    assert data.retrieve("qwertyuiop", corpus) == []
    pairs = data.eval_pairs(10, 0)
    assert len(pairs) == 10 and all(q.startswith("What does `") and a for q, a in pairs)


@pytest.fixture(scope="module")
def tiny(smollm2_lm):
    return pipeline.truncated(smollm2_lm, 1)


def test_sampling_goes_through_the_kv_cache_and_matches_a_no_cache_loop(tiny, monkeypatch):
    gen = importlib.import_module("mechinterp.models.generate")  # the module, not the function
    calls = []
    original = gen._generate
    monkeypatch.setattr(gen, "_generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    prompts = ["Q: What does `os.getcwd` do?\nQ:", pipeline.chat("Hi")]
    texts = pipeline.sample_texts(tiny, prompts, 3, temperature=0.0, top_k=None, seed=0)
    assert len(calls) == 1  # one batched KV-cache prefill + scanned decode
    forward = jax.jit(lambda p, t: tiny.model.apply({"params": p}, t))
    width = max(tiny.to_tokens(p).shape[1] for p in prompts) + 3
    for prompt, text in zip(prompts, texts):
        ids = list(np.asarray(tiny.to_tokens(prompt))[0])
        for _ in range(3):  # reference: the whole forward again at every step, no cache
            row = np.zeros((1, width), np.int32)  # right padding: causal, never attended
            row[0, :len(ids)] = ids
            ids.append(int(np.argmax(forward(tiny.params, row)[0, len(ids) - 1])))
        assert text == tiny.to_string(ids[-3:])
    sampled = pipeline.sample_texts(tiny, prompts, 2, temperature=0.9, top_k=5, seed=1)
    assert len(calls) == 2 and len(sampled) == 2
    with pytest.raises(ValueError, match="model.n_layers=99 is out of range"):
        pipeline.truncated(tiny, 99)


def test_encoded_rows_score_only_the_answer_and_its_end_token(tiny):
    rows = pipeline.encode_pairs(tiny, [("What does `a.b` do?", "It does c.")], 40)
    target = rows.tokens[0][rows.loss_mask[0] > 0]
    assert tiny.to_string(target) == "It does c." + pipeline.END
    prompt = rows.tokens[0][:np.flatnonzero(rows.loss_mask[0])[0]]
    assert tiny.to_string(prompt) == pipeline.chat("What does `a.b` do?")


def test_smoke_run_scores_every_model_and_accounts_for_every_candidate(smoke_run):
    workdir = smoke_run("self_specialization")
    report = (workdir / "report.md").read_text()
    assert "| paper's claim | ours | reproduced? |" in report and "Self-specialization" in report
    results = json.loads((workdir / "results.json").read_text())
    seed = results["per_seed"][0]
    for name in ("base", "seeds_only", "selfspec"):
        m = seed[name]
        assert 1 < m["answer_ppl"] and 0 <= m["token_accuracy"] <= 1
        assert math.isfinite(m["general_ppl"]) and m["general_ppl"] > 1
    spec = seed["selfspec"]
    assert spec["kept"] + sum(spec["dropped"].values()) == spec["generated"] == 4
    assert spec["train_pairs"] == len(data.SEEDS) + spec["kept"]
    assert seed["seeds_only"]["answer_nll"] != seed["base"]["answer_nll"]  # LoRA moved it
    assert 0 < seed["trainable_fraction"] < 0.01
    assert len(results["ablation"]["delta_nll"]) == 1
    assert all(math.isfinite(d) for d in results["ablation"]["delta_nll"])
    assert "KV cache" in results["sampler"] and results["eval_size"] == 4
