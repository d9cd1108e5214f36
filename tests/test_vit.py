"""The ViT family: logits, hidden states and attention patterns equal transformers'
ViTForImageClassification (tiny random config, 1e-4), and the TransformerLens-named grids
of mechinterp.patching run on it unchanged, checked against single interventions."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mechinterp  # noqa: E402
from mechinterp import Intervention, patching  # noqa: E402
from mechinterp.family import HasLayers, has  # noqa: E402
from mechinterp.models import load_hf  # noqa: E402
from mechinterp.models.vit import ViT  # noqa: E402
from random_params import random_variables  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=5, initializer_range=0.3,
        attn_implementation="eager")
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # random norms and biases too, so every tensor's mapping matters
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vit_hf")
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_hidden_states_and_patterns_match_transformers(hf_folder, scan_layers):
    folder, hf_model = hf_folder
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = hf_model(torch.tensor(x), output_hidden_states=True, output_attentions=True)
    model, params = load_hf(folder, scan_layers=scan_layers)
    assert isinstance(model, ViT) and has(model, HasLayers)
    logits, cache = mechinterp.capture(model, params, x.transpose(0, 2, 3, 1),
                                       sites=["resid_pre", "resid_post", "attn.pattern"])
    assert np.abs(ref.logits.numpy()).max() > 0.5  # not a near-zero comparison
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=1e-4)
    hidden = [h.numpy() for h in ref.hidden_states]
    np.testing.assert_allclose(cache["resid_pre"], np.stack(hidden[:2]), atol=1e-4)
    np.testing.assert_allclose(cache["resid_post"], np.stack(hidden[1:]), atol=1e-4)
    np.testing.assert_allclose(cache["attn.pattern"], np.stack([a.numpy() for a in
                                                                ref.attentions]), atol=1e-5)


def test_load_hf_names_a_missing_tensor(hf_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder, _ = hf_folder
    tensors = load_file(folder / "model.safetensors")
    del tensors["vit.encoder.layer.1.intermediate.dense.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="layer.1.intermediate.dense.bias"):
        load_hf(tmp_path)


def _metric(labels):
    def metric(logits):
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
    return metric


def test_transformerlens_grids_run_unchanged():
    model = ViT(image_size=4, patch_size=2, d_model=8, n_layers=2, n_heads=2, d_mlp=16,
                n_classes=3)
    clean = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    corrupted = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
    params = random_variables(model, clean)["params"]
    metric = _metric(jnp.array([0, 2]))
    _, cache = mechinterp.capture(model, params, clean, sites=["resid_pre", "attn.z"])
    n_pos = 5  # the class token and 4 patches

    resid = patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric,
                                             progress=False)
    heads = patching.get_act_patch_attn_head_out_by_pos(model, params, corrupted, cache,
                                                         metric, progress=False)
    assert resid.shape == (2, n_pos) and heads.shape == (2, n_pos, 2)
    for layer, pos, head in [(0, 0, 0), (1, n_pos - 1, 1), (1, 1, 0)]:
        mask = np.zeros((2, 1, n_pos, 2, 1), np.float32)
        mask[layer, :, pos, head] = 1
        out = mechinterp.intervene(model, params, corrupted, interventions={
            "attn.z": Intervention.patch(cache["attn.z"], jnp.asarray(mask))})
        np.testing.assert_allclose(heads.values[layer, pos, head], metric(out), atol=1e-5)
        mask = np.zeros((2, 1, n_pos, 1), np.float32)
        mask[layer, :, pos] = 1
        out = mechinterp.intervene(model, params, corrupted, interventions={
            "resid_pre": Intervention.patch(cache["resid_pre"], jnp.asarray(mask))})
        np.testing.assert_allclose(resid.values[layer, pos], metric(out), atol=1e-5)
    # patching every position of layer 0's residual stream restores the clean metric
    clean_metric = metric(model.apply({"params": params}, clean))
    whole = mechinterp.intervene(model, params, corrupted, interventions={
        "resid_pre": Intervention.patch(cache["resid_pre"],
                                        jnp.asarray([1.0, 0.0]).reshape(2, 1, 1, 1))})
    np.testing.assert_allclose(metric(whole), clean_metric, atol=1e-5)
    assert np.ptp(resid.values) > 1e-3


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="pool='avg' is not one of"):
        ViT(pool="avg")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViT(image_size=9, patch_size=2)
    with pytest.raises(ValueError, match=r"takes images \(batch, 8, 8, channels\)"):
        ViT().init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
