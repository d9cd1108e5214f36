"""The analysis core on a tiny model: list_sites, capture, intervene and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp as mi
from test_decoder import random_params
from toy_models import ToyModel, unstack

N_LAYERS, BATCH, D_IN = 3, 4, 6


def normal(seed, shape):
    """float32 normal noise from numpy (jax.random compiles a kernel per shape, ~2 s each
    on CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def setup():
    model = ToyModel(n_layers=N_LAYERS)
    x = normal(1, (BATCH, D_IN))
    params = random_params(model, x)
    return model, params, x


def layer_mask(layer, n=N_LAYERS):
    """A mask selecting one layer of a (layer, batch, feature) site."""
    return (jnp.arange(n) == layer).astype(jnp.float32)[:, None, None]


def test_list_sites_shapes_axes_without_compute(setup):
    model, _, x = setup
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    sites = mi.list_sites(model, spec)
    assert set(sites) == {"embed", "resid_pre", "hidden", "resid_post", "logits"}
    assert sites["hidden"].shape == (N_LAYERS, BATCH, 16)
    assert sites["hidden"].axes == ("layer", "batch", "neuron")
    assert sites["logits"].shape == (BATCH, 5)
    assert sites["embed"].dtype == np.float32
    # a flag that reaches one more site shows it
    assert "aux" in mi.list_sites(model, spec, use_aux=True)


def test_capture_matches_plain_apply_and_subsets(setup):
    model, params, x = setup
    plain = model.apply({"params": params}, x)
    out, cache = mi.capture(model, params, x)
    np.testing.assert_array_equal(out, plain)
    assert set(cache) == set(mi.list_sites(model, x))
    for name, info in mi.list_sites(model, x).items():
        assert cache[name].shape == info.shape
    np.testing.assert_array_equal(cache["logits"], plain)
    _, only = mi.capture(model, params, x, sites=["hidden"])
    assert set(only) == {"hidden"}
    np.testing.assert_array_equal(only["hidden"], cache["hidden"])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_noop_interventions_are_bit_identical(setup, scan_layers):
    model, params, x = setup
    if not scan_layers:
        model, params = ToyModel(n_layers=N_LAYERS, scan_layers=False), unstack(params, N_LAYERS)
    plain = model.apply({"params": params}, x)
    noops = {name: mi.Intervention.noop() for name in mi.list_sites(model, x)}
    np.testing.assert_array_equal(mi.intervene(model, params, x, interventions=noops), plain)
    identity = {"hidden": mi.Intervention(scale=1.0, add=0.0, mask=1.0)}
    np.testing.assert_array_equal(mi.intervene(model, params, x, interventions=identity), plain)


def _edited_resid(model, params, x, intervention):
    """resid_post of layer 0 edited by ``intervention``, as the next layer receives it."""
    _, cache = mi.capture(model, params, x, interventions={"resid_post": intervention})
    return cache["resid_post"][0], cache["resid_pre"][1]


def test_each_intervention_kind_applies_its_formula(setup):
    model, params, x = setup
    mask = layer_mask(0)
    value = normal(2, (N_LAYERS, BATCH, 8))
    vector = jnp.linspace(-1.0, 1.0, 8)
    cases = {
        "patch": (mi.Intervention.patch(value, mask), lambda r: value[0]),
        "zero": (mi.Intervention.zero(mask), lambda r: jnp.zeros_like(r)),
        "mean": (mi.Intervention.mean(vector, mask), lambda r: jnp.broadcast_to(vector, r.shape)),
        "scale": (mi.Intervention.scale_by(2.5, mask), lambda r: 2.5 * r),
        "steer": (mi.Intervention.steer(vector, mask), lambda r: r + vector),
    }
    edited = jax.jit(lambda interventions: {  # one compile for every kind
        kind: _edited_resid(model, params, x, intervention)
        for kind, intervention in interventions.items()})
    got = edited({kind: intervention for kind, (intervention, _) in cases.items()})
    for kind, (_, expected) in cases.items():
        original, received = got[kind]
        np.testing.assert_allclose(received, expected(original), rtol=1e-6, atol=1e-6, err_msg=kind)


def test_mask_selects_batch_rows_and_neurons(setup):
    model, params, x = setup
    _, clean = mi.capture(model, params, x)
    neuron_mask = jnp.zeros((N_LAYERS, BATCH, 16)).at[1, 2, 5].set(1.0)
    _, cache = mi.capture(
        model, params, x, interventions={"hidden": mi.Intervention.zero(neuron_mask)}
    )
    # layers 0 and 1 inputs unchanged, layer 2 input changed only in batch row 2
    np.testing.assert_array_equal(cache["resid_pre"][:2], clean["resid_pre"][:2])
    changed = np.abs(np.asarray(cache["resid_pre"][2] - clean["resid_pre"][2])).max(-1)
    assert changed[2] > 0 and np.all(changed[[0, 1, 3]] == 0)


def test_scan_equals_unrolled_with_interventions(setup):
    model, params, x = setup
    unrolled = ToyModel(n_layers=N_LAYERS, scan_layers=False)
    unrolled_params = unstack(params, N_LAYERS)
    value = normal(3, (N_LAYERS, BATCH, 16))
    interventions = {
        "hidden": mi.Intervention.patch(value, layer_mask(1)),
        "resid_pre": mi.Intervention.scale_by(jnp.array([1.0, 0.5, 2.0])[:, None, None]),
    }
    a, cache_a = mi.capture(model, params, x, interventions=interventions)
    b, cache_b = mi.capture(unrolled, unrolled_params, x, interventions=interventions)
    np.testing.assert_array_equal(a, b)
    for name in cache_a:
        np.testing.assert_array_equal(cache_a[name], cache_b[name], err_msg=name)


def test_a_one_layer_unrolled_stack_keeps_its_layer_axis():
    """``layers_0`` alone is still a stack: its sites carry the declared layer axis (1), and
    capture / interventions equal the scanned one-layer model's."""
    scanned = ToyModel(n_layers=1)
    x = normal(5, (BATCH, D_IN))
    params = scanned.init(jax.random.key(0), x)["params"]
    unrolled, unrolled_params = ToyModel(n_layers=1, scan_layers=False), unstack(params, 1)
    info = mi.list_sites(unrolled, x)["hidden"]
    assert info.shape == (1, BATCH, 16) and info.axes == ("layer", "batch", "neuron")
    ablate = {"hidden": mi.Intervention.zero(jnp.zeros((1, BATCH, 16)).at[0, 1].set(1.0))}
    a, cache_a = mi.capture(scanned, params, x, interventions=ablate)
    b, cache_b = mi.capture(unrolled, unrolled_params, x, interventions=ablate)
    np.testing.assert_array_equal(a, b)
    clean, _ = mi.capture(unrolled, unrolled_params, x)
    changed = np.abs(np.asarray(b - clean)).max(-1)  # the ablation reached batch row 1 only
    assert changed[1] > 0 and np.all(changed[[0, 2, 3]] == 0)
    for name in cache_a:
        np.testing.assert_array_equal(cache_a[name], cache_b[name], err_msg=name)


def test_vmap_over_sixteen_interventions_equals_separate_calls(setup):
    model, params, x = setup
    _, clean = mi.capture(model, params, x)
    corrupt_x = x[::-1]
    masks = jnp.asarray(np.random.default_rng(4).random((16, N_LAYERS, BATCH, 8)) < 0.3,
                        jnp.float32)

    def run(mask):
        patch = mi.Intervention.patch(clean["resid_post"], mask)
        return mi.intervene(model, params, corrupt_x, interventions={"resid_post": patch})

    batched = jax.jit(jax.vmap(run))(masks)
    for i in range(16):
        np.testing.assert_allclose(batched[i], run(masks[i]), rtol=1e-6, atol=1e-6)


def test_gradient_wrt_mask_matches_finite_difference(setup):
    model, params, x = setup
    _, clean = mi.capture(model, params, x)
    corrupt_x = x * -1.0
    direction = normal(5, (N_LAYERS, BATCH, 16))

    def metric(mask):
        patch = mi.Intervention.patch(clean["hidden"], mask)
        logits = mi.intervene(model, params, corrupt_x, interventions={"hidden": patch})
        return logits[:, 0].sum()

    mask0 = jnp.full((N_LAYERS, BATCH, 16), 0.3)
    grad = jax.grad(metric)(mask0)
    eps = 1e-3
    finite = (metric(mask0 + eps * direction) - metric(mask0 - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad, direction), finite, rtol=2e-3, atol=1e-4)


def test_works_inside_user_jit(setup):
    model, params, x = setup
    run = jax.jit(
        lambda s: mi.intervene(model, params, x, interventions={"embed": mi.Intervention.scale_by(s)})
    )
    # A no-op intervention is bit-identical to the plain forward only inside one compiled
    # computation; jit and eager are two compilations (XLA may fuse and round differently,
    # 6e-8 apart on some CPUs), so across them compare to float32 rounding.
    np.testing.assert_allclose(run(1.0), model.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(run(0.0), run(1.0))


# ---------------------------------------------------------------------------------------
# Bad input: each raises a clear error, never a silent no-op.


def test_unknown_site_names_close_matches(setup):
    model, params, x = setup
    with pytest.raises(KeyError, match=r"unknown site 'hiden'.*did you mean 'hidden'"):
        mi.intervene(model, params, x, interventions={"hiden": mi.Intervention.zero()})
    with pytest.raises(KeyError, match="unknown site 'nope'"):
        mi.capture(model, params, x, sites=["nope"])


def test_site_not_reached_is_an_error(setup):
    model, params, x = setup
    with pytest.raises(KeyError, match="'aux' exists in ToyModel but the forward never reaches"):
        mi.intervene(model, params, x, interventions={"aux": mi.Intervention.zero()})
    # reached when the flag is on
    mi.intervene(model, params, x, use_aux=True, interventions={"aux": mi.Intervention.zero()})


def test_wrong_shape_names_site_and_shapes(setup):
    model, params, x = setup
    bad = mi.Intervention.patch(jnp.zeros((N_LAYERS, BATCH, 7)))
    with pytest.raises(ValueError, match=r"add at site 'resid_post' has shape \(3, 4, 7\).*\(3, 4, 8\)"):
        mi.intervene(model, params, x, interventions={"resid_post": bad})


def test_mask_that_does_not_broadcast(setup):
    model, params, x = setup
    bad = mi.Intervention.zero(mask=jnp.ones((N_LAYERS + 1, 1, 1)))
    with pytest.raises(ValueError, match=r"mask at site 'hidden' has shape \(4, 1, 1\)"):
        mi.intervene(model, params, x, interventions={"hidden": bad})


def test_wrong_dtypes(setup):
    model, params, x = setup
    with pytest.raises(TypeError, match="mask at site 'hidden' has dtype int32"):
        mi.intervene(model, params, x, interventions={"hidden": mi.Intervention.zero(jnp.ones((), jnp.int32))})
    wrong_add = mi.Intervention.steer(jnp.ones((8,), jnp.float16))
    with pytest.raises(TypeError, match=r"add at site 'embed' has dtype float16 but the site is float32"):
        mi.intervene(model, params, x, interventions={"embed": wrong_add})


def test_not_an_intervention_and_not_a_dict(setup):
    model, params, x = setup
    with pytest.raises(TypeError, match=r"interventions\['hidden'\] is a dict"):
        mi.intervene(model, params, x, interventions={"hidden": {"scale": 0.0}})
    with pytest.raises(TypeError, match="interventions must be a dict"):
        mi.intervene(model, params, x, interventions=[mi.Intervention.zero()])


def test_whole_variables_dict_is_refused(setup):
    model, params, x = setup
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        mi.capture(model, {"params": params}, x)


def test_sites_missing_in_some_dropped_layers_are_listed_but_refused():
    from mechinterp.models import Decoder, DecoderConfig

    config = DecoderConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, d_mlp=24,
                           scan_layers=False, attn_layers=(0, 2), mlp_layers=(1,))
    model = Decoder(config)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = random_params(model, tokens)
    sites = mi.list_sites(model, tokens)
    assert sites["attn.z"].missing_layers == (1,)
    assert sites["mlp_out"].missing_layers == (0, 2)
    assert sites["resid_pre"].missing_layers == ()
    _, cache = mi.capture(model, params, tokens, sites=["resid_pre", "resid_post"])
    assert cache["resid_pre"].shape == (3, 1, 4, 16)
    with pytest.raises(ValueError, match=r"absent in layers \[1\]"):
        mi.capture(model, params, tokens, sites=["attn.z"])
    with pytest.raises(ValueError, match=r"absent in layers \[0, 2\]"):
        mi.intervene(model, params, tokens, interventions={"mlp_out": mi.Intervention.zero()})
