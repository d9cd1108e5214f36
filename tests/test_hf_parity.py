"""Hugging Face parity: tiny random transformers models, saved and loaded with load_hf.

Every model is built from a config (no hub downloads), given random non-trivial weights
(norm scales near 1, biases non-zero), saved with ``save_pretrained`` (safetensors) and
compared in float32 with eager attention.
"""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mechinterp.models import Decoder, generate, load_hf, save_hf  # noqa: E402
from mechinterp.models.hf_config import config_from_hf  # noqa: E402

TOL = 1e-4
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
             eos_token_id=None, pad_token_id=0)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
FAMILIES = {
    "llama_gqa": lambda: transformers.LlamaConfig(**SIZES, rms_norm_eps=1e-5),
    "llama3_rope": lambda: transformers.LlamaConfig(**SIZES, rope_parameters=LLAMA3_ROPE),
    "llama_linear_rope": lambda: transformers.LlamaConfig(
        **SIZES, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "llama_tied": lambda: transformers.LlamaConfig(**SIZES, tie_word_embeddings=True),
    "qwen2_bias": lambda: transformers.Qwen2Config(**SIZES, tie_word_embeddings=True),
    "qwen3_qk_norm": lambda: transformers.Qwen3Config(**SIZES, head_dim=32),
    "mistral": lambda: transformers.MistralConfig(**SIZES, sliding_window=None),
}


def randomize_(model, seed=0):
    """Replace HF's init (zero biases, unit norms) by weights that exercise every tensor."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def hf_model(config):
    config._attn_implementation = "eager"
    return randomize_(transformers.AutoModelForCausalLM.from_config(config)).eval()


def random_params(model, tokens, seed=0):
    """Random weights for ``model`` without compiling its init: norm scales near 1, the rest
    (biases included) normal with std 0.15."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return 1 + 0.1 * noise if is_norm else 0.15 * noise
    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


def tokens_and_mask(batch=3, length=10, seed=0):
    """Random tokens; row 0 unpadded, rows 1 and 2 left-padded by 3 and 7."""
    tokens = np.random.default_rng(seed).integers(0, SIZES["vocab_size"], (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, :3] = 0
    mask[2, :7] = 0
    return tokens, mask


def hf_logits(model, tokens, mask):
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its folder, our model, our params)."""
    reference = hf_model(FAMILIES[request.param]())
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    model, params = load_hf(folder)
    return request.param, reference, folder, model, params


def test_logits_match_hf(family):
    name, reference, _, model, params = family
    tokens, mask = tokens_and_mask()
    apply = jax.jit(model.apply)
    padded = np.asarray(apply({"params": params}, tokens, mask))
    real = mask.astype(bool)
    diff_padded = np.abs(padded - hf_logits(reference, tokens, mask))[real].max()
    ones = np.ones_like(mask)
    unpadded = np.asarray(apply({"params": params}, tokens, ones))
    diff_unpadded = np.abs(unpadded - hf_logits(reference, tokens, ones)).max()
    print(f"{name}: max |logit diff| padded {diff_padded:.2e}, unpadded {diff_unpadded:.2e}")
    assert diff_padded <= TOL and diff_unpadded <= TOL


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias", "qwen3_qk_norm"],
                         indirect=True)
def test_greedy_generation_matches_hf(family):
    _, reference, _, model, params = family
    tokens, mask = tokens_and_mask()
    ours = generate(model, params, tokens, mask, max_new_tokens=6)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                                    do_sample=False, max_new_tokens=6, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_config_fields():
    hf = FAMILIES["qwen3_qk_norm"]().to_dict()
    hf["architectures"] = ["Qwen3ForCausalLM"]
    config = config_from_hf(hf)
    assert (config.d_head, config.n_kv_heads, config.qk_norm, config.qkv_bias) == (
        32, 2, True, False)
    assert config.architecture == "Qwen3ForCausalLM"


@pytest.mark.parametrize("family_name", ["llama_gqa", "qwen2_bias", "qwen3_qk_norm"])
def test_save_hf_loads_in_transformers(family_name, tmp_path):
    """Our random weights -> save_hf -> transformers gives the same logits; load_hf inverts."""
    hf = FAMILIES[family_name]().to_dict()
    hf["architectures"] = [{"llama_gqa": "LlamaForCausalLM", "qwen2_bias": "Qwen2ForCausalLM",
                            "qwen3_qk_norm": "Qwen3ForCausalLM"}[family_name]]
    model = Decoder(config_from_hf(hf))
    tokens, mask = tokens_and_mask()
    params = random_params(model, tokens)
    save_hf(model, params, tmp_path)

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, tokens, mask))
    real = mask.astype(bool)
    assert np.abs(ours - hf_logits(reference, tokens, mask))[real].max() <= TOL

    _, reloaded = load_hf(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, reloaded, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("family", ["llama_gqa", "llama3_rope", "llama_linear_rope"],
                         indirect=True)
def test_transformers_4_config_style(family, tmp_path):
    """A 4.x config.json (rope_theta + rope_scaling with 'type') loads to the same config."""
    _, _, folder, model, _ = family
    hf = json.loads((folder / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    hf["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    hf["torch_dtype"] = hf.pop("dtype")
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    legacy, _ = load_hf(tmp_path)
    assert legacy.config == model.config


def test_bf16_checkpoint(tmp_path):
    """bf16 safetensors load (numpy has no bfloat16: goes through safetensors' flax reader)."""
    hf_model(FAMILIES["llama_gqa"]()).to(torch.bfloat16).save_pretrained(tmp_path)
    # The same bf16-rounded weights in float32 (a fresh model: `.to(bfloat16)` also rounds
    # the RoPE inv_freq buffer, which a float32 reload recomputes).
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    model, params = load_hf(tmp_path)
    tokens, mask = tokens_and_mask()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, tokens, mask))
    assert np.abs(ours - hf_logits(reference, tokens, mask))[mask.astype(bool)].max() <= TOL
    bf16_model, bf16_params = load_hf(tmp_path, dtype=jnp.bfloat16, scan_layers=False)
    assert bf16_model.config.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}
    assert "layers_1" in bf16_params
    save_hf(bf16_model, bf16_params, tmp_path / "resaved")
    with safe_open(tmp_path / "resaved" / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    _, reloaded = load_hf(tmp_path / "resaved", dtype=jnp.bfloat16, scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, reloaded, bf16_params)


def test_sharded_checkpoint(tmp_path):
    reference = hf_model(FAMILIES["qwen2_bias"]())
    reference.save_pretrained(tmp_path / "one")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, single = load_hf(tmp_path / "one")
    _, sharded = load_hf(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, single, sharded)


# ------------------------------------------------------------------------------ bad inputs


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_bad_inputs")
    hf_model(FAMILIES["llama_gqa"]()).save_pretrained(folder)
    return folder


def edited_copy(source, target, **config_changes):
    shutil.copytree(source, target, dirs_exist_ok=True)
    hf = json.loads((target / "config.json").read_text())
    hf.update(config_changes)
    (target / "config.json").write_text(json.dumps(hf))
    return target


@pytest.mark.parametrize("changes, words", [
    (dict(architectures=["GPT2LMHeadModel"]), ["architectures", "GPT2LMHeadModel"]),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
     ["rope_type", "yarn"]),
    (dict(rope_parameters=None, rope_scaling=dict(type="dynamic", factor=2.0)),
     ["rope_scaling", "dynamic"]),
    (dict(architectures=["MistralForCausalLM"], sliding_window=4096),
     ["sliding_window", "4096"]),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True),
     ["use_sliding_window"]),
    (dict(architectures=["Qwen3ForCausalLM"], layer_types=["full_attention",
                                                          "sliding_attention"]),
     ["layer_types", "sliding_attention"]),
    (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
    (dict(attention_bias=True), ["attention_bias"]),
    (dict(mlp_bias=True), ["mlp_bias"]),
])
def test_unsupported_config_is_refused(llama_folder, tmp_path, changes, words):
    folder = edited_copy(llama_folder, tmp_path, **changes)
    with pytest.raises(ValueError) as error:
        load_hf(folder)
    for word in words:
        assert word in str(error.value)


def rewrite_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(llama_folder, tmp_path):
    folder = edited_copy(llama_folder, tmp_path)
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj"):
        load_hf(folder)


def test_wrong_shape(llama_folder, tmp_path):
    folder = edited_copy(llama_folder, tmp_path)

    def shrink(tensors):
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = tensors[name][:16]
    rewrite_tensors(folder, shrink)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj\.weight.*\(16, 64\)"):
        load_hf(folder)


def test_unexpected_tensor(llama_folder, tmp_path):
    folder = edited_copy(llama_folder, tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias":
                                                np.zeros(64, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*o_proj\.bias"):
        load_hf(folder)


def test_pickle_only_folder_is_refused(llama_folder, tmp_path):
    shutil.copy(llama_folder / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors"):
        load_hf(tmp_path)
