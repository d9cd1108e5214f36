"""Patching grids agree with TransformerLens's on the same Hugging Face weights.

Tiny random LLaMA (grouped-query attention: 4 query heads, 2 key/value heads) and Qwen2
(q/k/v biases, same GQA) models are built from configs with ``torch.manual_seed``, saved
with ``save_pretrained`` to a temporary folder, and loaded by both libraries from there:

- ours: ``mechinterp.models.load_hf(folder)`` (float32);
- TransformerLens 4.x: ``TransformerBridge.boot_transformers(folder, dtype=torch.float32,
  device="cpu")``. This works offline from a local folder, but only if a tokenizer is saved
  in the same folder: without one, boot fails trying to build a tokenizer ("Couldn't
  instantiate the backend tokenizer ..."). We build a tiny word-level tokenizer in code
  (``tokenizers.models.WordLevel`` wrapped in ``PreTrainedTokenizerFast``) and
  ``save_pretrained`` it next to the weights; no hub access is needed. TransformerLens 4.x
  has no ``HookedTransformer`` any more (importing it raises), so the 3.x
  ``from_pretrained_no_processing(hf_model=...)`` route is not available here. A freshly
  booted bridge is in eval mode, float32, with raw HF weights (no ``fold_ln``, no
  centering: ``compatibility_mode`` is off and weights are not processed), and with eager
  attention, so its hooks see the attention pattern.

What TransformerLens 4.3's bridge hooks are, for LLaMA/Qwen2 (checked by
``test_caches_agree``): ``blocks.L.attn.hook_q`` / ``hook_k`` / ``hook_v`` are the
projections reshaped to heads *before* RoPE (``hook_rot_q`` / ``hook_rot_k`` come after),
with keys and values over the ``n_key_value_heads`` KV heads (not repeated to the query
heads); ``hook_pattern`` is ``[batch, head, dest_pos, src_pos]``; ``hook_z`` is the
pattern-weighted values per query head. Ours: ``attn.q``/``attn.k`` are pre-RoPE too,
``attn.k``/``attn.v`` are over KV heads, ``attn.pattern`` is ``(head, query_pos, key_pos)``.
So the grids line up index for index: TL's k/v grids run over ``n_key_value_heads`` exactly
as ours run over ``kv_head``, and TL's pattern grids are ``(layer, head, dest_pos)`` like
ours ``(layer, head, query_pos)``.

Both sides get the same clean/corrupted tokens and the same metric: the logit difference
between a correct and an incorrect answer token at the last position, mean over the batch
(TransformerLens: a torch function of the full logits; ours:
``mechinterp.metrics.logit_diff``, which makes the sweep compute only last-position logits).

Torch runs single-threaded here: for a model this small, intra-op threads only add
synchronisation, which becomes very slow when the 2 cores are shared with other processes.
"""

import numpy as np
import pytest

pytest.importorskip("transformer_lens")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp
import transformer_lens.patching as tl_patching
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformer_lens.model_bridge import TransformerBridge

import mechinterp
from mechinterp import patching
from mechinterp.metrics import logit_diff
from mechinterp.models import load_hf

TOL = 1e-4
VOCAB, D_MODEL, D_MLP, N_LAYERS, N_HEADS, N_KV_HEADS = 96, 64, 128, 2, 4, 2
BATCH, SEQ = 2, 8
CORRECT, INCORRECT = np.array([5, 7]), np.array([9, 11])
FAMILIES = {
    "llama": lambda **kw: transformers.LlamaConfig(**kw, rms_norm_eps=1e-5),
    "qwen2": lambda **kw: transformers.Qwen2Config(**kw, rms_norm_eps=1e-6),
}

slow = pytest.mark.slow
# The unmarked grids (resid_pre, head_out_by_pos and the GQA key grid) run in well under a
# minute for both families; the rest are @slow (every grid compiles once on our side).
GRIDS = [
    "resid_pre",
    "attn_head_out_by_pos",
    "attn_head_k_by_pos",
    pytest.param("attn_out", marks=slow),
    pytest.param("mlp_out", marks=slow),
    pytest.param("attn_head_q_by_pos", marks=slow),
    pytest.param("attn_head_v_by_pos", marks=slow),
    pytest.param("attn_head_pattern_by_pos", marks=slow),
    pytest.param("attn_head_pattern_dest_src_pos", marks=slow),
    pytest.param("attn_head_out_all_pos", marks=slow),
    pytest.param("attn_head_q_all_pos", marks=slow),
    pytest.param("attn_head_k_all_pos", marks=slow),
    pytest.param("attn_head_v_all_pos", marks=slow),
    pytest.param("attn_head_pattern_all_pos", marks=slow),
]
# TL grid shapes (n_kv_heads for k/v), i.e. what ours must return as well.
EXPECTED_SHAPES = {
    "resid_pre": (N_LAYERS, SEQ),
    "attn_out": (N_LAYERS, SEQ),
    "mlp_out": (N_LAYERS, SEQ),
    "attn_head_out_by_pos": (N_LAYERS, SEQ, N_HEADS),
    "attn_head_q_by_pos": (N_LAYERS, SEQ, N_HEADS),
    "attn_head_k_by_pos": (N_LAYERS, SEQ, N_KV_HEADS),
    "attn_head_v_by_pos": (N_LAYERS, SEQ, N_KV_HEADS),
    "attn_head_pattern_by_pos": (N_LAYERS, N_HEADS, SEQ),
    "attn_head_pattern_dest_src_pos": (N_LAYERS, N_HEADS, SEQ, SEQ),
    "attn_head_out_all_pos": (N_LAYERS, N_HEADS),
    "attn_head_q_all_pos": (N_LAYERS, N_HEADS),
    "attn_head_k_all_pos": (N_LAYERS, N_KV_HEADS),
    "attn_head_v_all_pos": (N_LAYERS, N_KV_HEADS),
    "attn_head_pattern_all_pos": (N_LAYERS, N_HEADS),
}
# our site name -> TransformerLens hook name (format with the layer)
HOOKS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "attn.q": "blocks.{}.attn.hook_q",
    "attn.k": "blocks.{}.attn.hook_k",
    "attn.v": "blocks.{}.attn.hook_v",
    "attn.pattern": "blocks.{}.attn.hook_pattern",
    "attn.z": "blocks.{}.attn.hook_z",
    "attn_out": "blocks.{}.hook_attn_out",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "resid_post": "blocks.{}.hook_resid_post",
}


def _tokenizer():
    """A word-level tokenizer ("t0" ... "t95") built in code: no download, no sentencepiece."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="t0", bos_token="t1", eos_token="t2",
        pad_token="t3",
    )


def _save_hf_folder(family, folder, seed=0):
    config = FAMILIES[family](
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF's init (std 0.02, zero biases) gives near-flat grids
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(f"tl_{family}")
    _save_hf_folder(family, folder)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bridge = TransformerBridge.boot_transformers(str(folder), dtype=torch.float32,
                                                 device="cpu")
    bridge.eval()
    assert not bridge.compatibility_mode  # raw HF weights: no folding or centering
    assert bridge.cfg.n_key_value_heads == N_KV_HEADS

    model, params = load_hf(folder)

    rng = np.random.default_rng(0)
    clean = rng.integers(4, VOCAB, (BATCH, SEQ))
    corrupted = clean.copy()
    corrupted[:, [2, 5]] = (clean[:, [2, 5]] + rng.integers(1, VOCAB - 4, (BATCH, 2))) % VOCAB
    correct_t, incorrect_t = torch.tensor(CORRECT), torch.tensor(INCORRECT)

    def tl_metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, correct_t[:, None])
                - last.gather(-1, incorrect_t[:, None])).mean()

    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(torch.tensor(clean))
    logits, cache = mechinterp.capture(model, params, jnp.asarray(clean))
    try:
        yield dict(
            family=family, bridge=bridge, model=model, params=params,
            clean=clean, corrupted=corrupted, tl_metric=tl_metric,
            metric=logit_diff(jnp.asarray(CORRECT), jnp.asarray(INCORRECT)),
            tl_logits=tl_logits.numpy(), tl_cache=tl_cache, logits=np.asarray(logits),
            cache=cache,
        )
    finally:
        torch.set_num_threads(threads)


def test_caches_agree(setup):
    """Same logits, and every patched site equals the TransformerLens hook it stands for."""
    s = setup
    np.testing.assert_allclose(s["logits"], s["tl_logits"], atol=TOL, rtol=0)
    for site_name, hook in HOOKS.items():
        ours = np.asarray(s["cache"][site_name])
        for layer in range(N_LAYERS):
            theirs = s["tl_cache"][hook.format(layer)].numpy()
            assert ours[layer].shape == theirs.shape, (site_name, layer)
            np.testing.assert_allclose(ours[layer], theirs, atol=TOL, rtol=0,
                                       err_msg=f"{site_name} vs {hook.format(layer)}")


def test_corruption_changes_the_metric(setup):
    s = setup
    clean_value = float(s["metric"](s["logits"]))
    corrupted_logits = mechinterp.capture(s["model"], s["params"],
                                          jnp.asarray(s["corrupted"]), sites=["logits"])[0]
    corrupted_value = float(s["metric"](corrupted_logits))
    with torch.no_grad():
        tl_corrupted = float(s["tl_metric"](s["bridge"](torch.tensor(s["corrupted"]))))
    assert abs(corrupted_value - tl_corrupted) < TOL
    assert abs(clean_value - corrupted_value) > 0.1


@pytest.mark.parametrize("grid", GRIDS)
def test_grid_matches_transformerlens(setup, grid):
    s = setup
    name = f"get_act_patch_{grid}"
    with torch.no_grad():
        theirs = getattr(tl_patching, name)(
            s["bridge"], torch.tensor(s["corrupted"]), s["tl_cache"], s["tl_metric"]
        ).numpy()
    ours = getattr(patching, name)(
        s["model"], s["params"], jnp.asarray(s["corrupted"]), s["cache"], s["metric"],
        progress=False,
    )
    ours = np.asarray(ours)
    assert theirs.shape == EXPECTED_SHAPES[grid]
    assert ours.shape == theirs.shape
    # the comparison means something only if the grid is not flat
    assert np.ptp(theirs) > 0.05, f"{grid}: TransformerLens grid is flat"
    print(f"{s['family']} {grid}: max abs diff {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0, err_msg=f"{s['family']} {grid}")
