"""Attribution graphs: edges against the Jacobian of an independent plain-jnp local
replacement model (attention patterns and norm factors frozen), exact row sums (with the
position-0 MLP outputs in the constant), feature effect predictions, the public
intervention_variables / read_sites the graph runs on, and influence / scores / pruning on
hand-built adjacency matrices."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import Decoder, DecoderConfig

import mechinterp as mi
from mechinterp import attribution_graph as G
from mechinterp import transcoders as T

CONFIG = DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_mlp=32)
N_FEATURES, T_LEN = 12, 5


@pytest.fixture(scope="module")
def setup():
    model = Decoder(CONFIG)
    tokens = jax.random.randint(jax.random.key(0), (T_LEN,), 0, CONFIG.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), tokens[None])["params"]
    tc = T.Transcoder(d_in=16, d_out=16, n_features=N_FEATURES)
    tc_params = T.init_layers(tc, jax.random.key(2), CONFIG.n_layers)
    keys = jax.random.split(jax.random.key(3), 2)
    tc_params = {**tc_params,
                 "b_enc": 0.05 * jax.random.normal(keys[0], (2, N_FEATURES)),
                 "b_dec": 0.01 * jax.random.normal(keys[1], (2, 16))}
    graph = G.attribute(model, params, tokens, tc, tc_params, logit_tokens=[3, 7, 11],
                        chunk_size=16)
    return model, params, tokens, tc, tc_params, graph


def _reference(model, params, tokens):
    """A plain-jnp local replacement model built from the parameters and the clean run:
    ``(embed (T, d), mlp_write (L, T, d)) -> (resid_mid (L, T, d), last logits (V,))``."""
    p = nn.meta.unbox(params)
    lay = p["layers"]
    _, cache = mi.capture(model, params, tokens[None],
                          sites=["resid_pre", "resid_mid", "resid_post", "attn.pattern"])
    eps = CONFIG.rms_norm_eps

    def frozen_norm(x, x_clean, w):
        return w * x / jnp.sqrt(jnp.mean(x_clean ** 2, -1, keepdims=True) + eps)

    group = CONFIG.n_heads // CONFIG.n_kv_heads

    def forward(embed, mlp_write):
        r, mids = embed, []
        for layer in range(CONFIG.n_layers):
            x = frozen_norm(r, cache["resid_pre"][layer, 0], lay["attn_norm"]["scale"][layer])
            v = jnp.repeat(jnp.einsum("td,dkh->tkh", x, lay["attn"]["wv"][layer]), group, 1)
            z = jnp.einsum("hqk,khd->qhd", cache["attn.pattern"][layer, 0], v)
            r = r + jnp.einsum("qhd,hde->qe", z, lay["attn"]["wo"][layer])
            mids.append(r)
            r = r + mlp_write[layer]
        final = frozen_norm(r, cache["resid_post"][-1, 0], p["norm"]["scale"])
        return jnp.stack(mids), final[-1] @ p["lm_head"]

    def mlp_in(resid_mid):
        return frozen_norm(resid_mid, cache["resid_mid"][:, 0],
                           lay["mlp_norm"]["scale"][:, None, :])
    return forward, mlp_in


def _reference_targets(setup):
    model, params, tokens, _, tc_params, graph = setup
    forward, mlp_in = _reference(model, params, tokens)
    f = graph.features

    def targets(embed, mlp_write):
        resid_mid, logits = forward(embed, mlp_write)
        x = mlp_in(resid_mid)[f[:, 0], f[:, 1]]
        pre = jnp.sum(x * tc_params["W_enc"][f[:, 0], :, f[:, 2]], -1)
        pre = pre + tc_params["b_enc"][f[:, 0], f[:, 2]]
        return jnp.concatenate([pre, logits[graph.logit_tokens] - logits.mean()])
    return jax.jit(targets)


def test_edges_equal_the_jacobian_of_the_frozen_reference_model(setup):
    model, params, tokens, tc, tc_params, graph = setup
    assert graph.first_position_excluded and graph.n_features > 0
    assert (graph.features[:, 1] > 0).all()  # no feature node at position 0 (BOS)
    targets = _reference_targets(setup)
    acts = T.mlp_activations(model, params, tokens[None])
    y_hat, _ = T.apply_layers(tc, tc_params, acts["mlp_in"][:, 0])
    errors = (acts["mlp_out"][:, 0] - y_hat).at[:, 0].set(0.0)  # position 0: no error edges
    _, cache = mi.capture(model, params, tokens[None], sites=["embed"])
    embed = cache["embed"][0]
    mlp_out = acts["mlp_out"][:, 0]
    # The reference reproduces the real model at the clean point.
    np.testing.assert_allclose(targets(embed, mlp_out), graph.target_values, atol=2e-5)

    j_embed, j_mlp = jax.jacobian(targets, argnums=(0, 1))(embed, mlp_out)
    f = graph.features
    writes = tc_params["W_dec"][f[:, 0], f[:, 2]] * graph.activations[:, None]
    expected = np.concatenate([
        np.einsum("nsd,sd->ns", j_mlp[:, f[:, 0], f[:, 1]], writes),
        np.einsum("nltd,ltd->nlt", j_mlp, errors).reshape(len(j_mlp), -1),
        np.einsum("ntd,td->nt", j_embed, embed)], axis=1)
    rows = np.concatenate([graph.adjacency[:graph.n_features],
                           graph.adjacency[-graph.n_logits:]])
    n_sources = expected.shape[1]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(rows[:, :n_sources], expected, atol=1e-5 * scale)
    assert (rows[:, n_sources:] == 0).all()  # nothing flows into logits' columns
    # Same-layer and later features never feed a feature (causality of the graph).
    layer_of = f[:, 0]
    feature_block = graph.adjacency[:graph.n_features, :graph.n_features]
    assert (feature_block[layer_of[:, None] <= layer_of[None, :]] == 0).all()


def test_a_finite_difference_of_the_reference_equals_an_edge(setup):
    model, params, tokens, _, tc_params, graph = setup
    targets = _reference_targets(setup)
    acts = T.mlp_activations(model, params, tokens[None])
    _, cache = mi.capture(model, params, tokens[None], sites=["embed"])
    embed, mlp_out = cache["embed"][0], acts["mlp_out"][:, 0]
    source = int(np.argmax(graph.features[:, 0] == 0))  # a layer-0 feature
    layer, pos, feature = graph.features[source]
    h = 0.5  # the model is linear, so a large step is exact up to rounding
    bump = mlp_out.at[layer, pos].add(h * tc_params["W_dec"][layer, feature])
    change = (targets(embed, bump) - targets(embed, mlp_out)) / h
    column = np.concatenate([graph.adjacency[:graph.n_features, source],
                             graph.adjacency[-graph.n_logits:, source]])
    np.testing.assert_allclose(change * graph.activations[source], column,
                               atol=1e-4 * np.abs(column).max())


def test_rows_sum_to_the_real_values_minus_the_constant_part(setup):
    model, params, tokens, tc, tc_params, graph = setup
    acts = T.mlp_activations(model, params, tokens[None])
    pre = T.apply_layers(tc, tc_params, acts["mlp_in"][:, 0], method="pre")
    f = graph.features
    logits = np.asarray(model.apply({"params": params}, tokens[None])[0, -1])
    real = np.concatenate([np.asarray(pre)[f[:, 0], f[:, 1], f[:, 2]],
                           logits[graph.logit_tokens] - logits.mean()])
    np.testing.assert_allclose(graph.target_values, real, atol=2e-5)
    # The constant part is the reference model with every source at zero: only the decoder
    # biases b_dec written, except at position 0, whose whole clean MLP output is held
    # (its features are no nodes); plus the encoder bias.
    targets = _reference_targets(setup)
    zero_sources = jnp.broadcast_to(tc_params["b_dec"][:, None], (2, T_LEN, 16))
    zero_sources = zero_sources.at[:, 0].set(acts["mlp_out"][:, 0, 0])
    bias = targets(jnp.zeros((T_LEN, 16)), zero_sources)
    np.testing.assert_allclose(graph.target_bias, bias, atol=2e-5)


def test_keeping_position_0_moves_its_edges_out_of_the_constant(setup):
    model, params, tokens, tc, tc_params, graph = setup
    full = G.attribute(model, params, tokens, tc, tc_params, logit_tokens=[3, 7, 11],
                       chunk_size=16, exclude_first_position=False)
    first = np.flatnonzero(full.features[:, 1] == 0)
    assert not full.first_position_excluded and len(first) > 0
    np.testing.assert_array_equal(full.features[full.features[:, 1] > 0], graph.features)
    # Same targets and the same edges among later features; the excluded graph's constant
    # = the full graph's constant plus the full graph's edges from position-0 features and
    # position-0 error nodes.
    later = np.flatnonzero(full.features[:, 1] > 0)
    kept = np.r_[later, full.n_features + np.arange(full.n_logits)]  # into target_values
    rows = np.r_[later, full.n_nodes - full.n_logits + np.arange(full.n_logits)]
    np.testing.assert_allclose(full.target_values[kept], graph.target_values, atol=1e-6)
    np.testing.assert_allclose(full.adjacency[np.ix_(later, later)],
                               graph.adjacency[:graph.n_features, :graph.n_features], atol=1e-6)
    sources = np.r_[first, [full.error_node(layer, 0) for layer in range(full.n_layers)]]
    moved = full.adjacency[np.ix_(rows, sources)].sum(axis=1)
    assert np.abs(moved).max() > 1e-3  # position 0 matters here, so the check can fail
    np.testing.assert_allclose(graph.target_bias, full.target_bias[kept] + moved, atol=2e-5)


def _replacement_effect(setup, nodes, deltas, propagate):
    """Logit change in the reference local replacement model when the activations of
    ``nodes`` move by ``deltas``: later layers' active features are recomputed from their
    frozen-norm inputs (slope 1) when ``propagate``, held otherwise."""
    model, params, tokens, tc, tc_params, graph = setup
    forward, mlp_in = _reference(model, params, tokens)
    acts = T.mlp_activations(model, params, tokens[None])
    y_hat, _ = T.apply_layers(tc, tc_params, acts["mlp_in"][:, 0])
    errors = acts["mlp_out"][:, 0] - y_hat
    _, cache = mi.capture(model, params, tokens[None], sites=["embed"])
    f = graph.features
    activations = jnp.asarray(graph.activations)
    shift = jnp.zeros(len(f)).at[jnp.asarray(nodes)].set(jnp.asarray(deltas))

    def write(a):  # position 0 (no feature nodes) holds its clean MLP output
        out = jnp.zeros((2, T_LEN, N_FEATURES)).at[f[:, 0], f[:, 1], f[:, 2]].set(a)
        mlp = jnp.einsum("ltf,lfd->ltd", out, tc_params["W_dec"]) + tc_params["b_dec"][:, None] + errors
        return mlp.at[:, 0].set(acts["mlp_out"][:, 0, 0])

    a = activations + shift
    for _ in range(CONFIG.n_layers if propagate else 0):
        resid_mid, _ = forward(cache["embed"][0], write(a))
        pre = jnp.sum(mlp_in(resid_mid)[f[:, 0], f[:, 1]] * tc_params["W_enc"][f[:, 0], :, f[:, 2]], -1)
        a = pre + tc_params["b_enc"][f[:, 0], f[:, 2]] + shift
    base = forward(cache["embed"][0], write(activations))[1]
    moved = forward(cache["embed"][0], write(a))[1]
    demean = lambda z: z[graph.logit_tokens] - z.mean()
    return np.asarray(demean(moved) - demean(base))


@pytest.mark.parametrize("propagate", [True, False])
def test_predicted_feature_effects_equal_the_local_replacement_model(setup, propagate):
    graph = setup[-1]
    nodes = [int(np.argmax(graph.features[:, 0] == 0)), int(np.argmax(graph.features[:, 0] == 1))]
    deltas = [-graph.activations[nodes[0]], 0.7]
    predicted = G.predicted_logit_effects(graph, nodes, deltas, propagate=propagate)
    expected = _replacement_effect(setup, nodes, deltas, propagate)
    np.testing.assert_allclose(predicted, expected, atol=1e-4 * np.abs(expected).max())


def test_actual_effects_are_the_steered_model_minus_the_clean_one(setup):
    model, params, tokens, _, tc_params, graph = setup
    node = int(np.argmax(graph.features[:, 0] == 1))
    zero = G.actual_logit_effects(model, params, graph, tc_params, [node], [0.0])
    np.testing.assert_array_equal(zero, 0.0)
    layer, pos, feature = graph.features[node]
    steered = np.asarray(mi.intervene(model, params, tokens[None], interventions=T.steer_features(
        tc_params, [(layer, pos, feature)], [2.0], (2, 1, T_LEN, 16)))[0, -1])
    clean = np.asarray(model.apply({"params": params}, tokens[None])[0, -1])
    ids = graph.logit_tokens
    expected = (steered[ids] - steered.mean()) - (clean[ids] - clean.mean())
    np.testing.assert_allclose(G.actual_logit_effects(model, params, graph, tc_params, [node],
                                                      [2.0]), expected, atol=1e-5)


def test_intervention_variables_match_intervene_and_reject_bad_interventions(setup):
    model, params, tokens, *_ = setup
    x = tokens[None]
    add = 0.3 * np.random.default_rng(0).normal(size=(CONFIG.n_layers, 1, T_LEN, 16))
    mask = np.zeros((1, 1, T_LEN, 1))
    mask[..., 2, :] = 1.0
    steer = {"mlp_out": mi.Intervention.steer(add.astype(np.float32), mask=mask)}

    @jax.jit  # one compilation for both forwards; x is traced
    def by_hand_and_intervene(params, x):
        variables, infos = mi.intervention_variables(model, x, interventions=steer)
        out, state = model.apply({"params": params, **variables}, x, mutable=["intermediates"])
        sites = mi.read_sites(state, infos, ["resid_mid", "mlp_out", "resid_post"])
        return out, sites, mi.intervene(model, params, x, interventions=steer)

    out, sites, expected = by_hand_and_intervene(params, x)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # read_sites stacks the layers in order: the steer lands at position 2 of each layer.
    assert sites["mlp_out"].shape == (2, 1, T_LEN, 16)
    np.testing.assert_allclose(sites["resid_post"] - sites["resid_mid"] - sites["mlp_out"],
                               add * mask, atol=1e-5)
    variables, infos = mi.intervention_variables(model, x, interventions=steer)
    assert variables["interventions"] and infos["mlp_out"].shape == (2, 1, T_LEN, 16)
    assert mi.intervention_variables(model, x, interventions={})[0] == {}
    with pytest.raises(ValueError, match=r"'mlp_out' has shape \(3, 16\).*\(2, 1, 5, 16\)"):
        mi.intervention_variables(model, x, interventions={
            "mlp_out": mi.Intervention.steer(jnp.ones((3, 16)))})
    with pytest.raises(KeyError, match="did you mean 'mlp_out'"):
        mi.intervention_variables(model, x, interventions={"mlp_ot": steer["mlp_out"]})
    with pytest.raises(TypeError, match="expected a mechinterp.Intervention"):
        mi.intervention_variables(model, x, interventions={"mlp_out": jnp.ones(16)})
    with pytest.raises(KeyError, match=r"mutable=\['intermediates'\]"):
        mi.read_sites({}, infos, "resid_mid")
    with pytest.raises(KeyError, match="did you mean 'resid_mid'"):
        mi.read_sites({}, infos, "resid_mdi")


def test_export_json_and_png(setup, tmp_path):
    graph = setup[-1]
    pruned = G.prune(graph, node_threshold=0.9, edge_threshold=0.95)
    data = G.to_json(pruned, G.graph_scores(graph))
    text = json.dumps(data)
    data = json.loads(text)
    assert data["metadata"]["schema"] == G.SCHEMA
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) == pruned.node_mask.sum()
    assert {n["kind"] for n in data["nodes"]} >= {"token", "logit"}
    assert len(data["links"]) == pruned.edge_mask.sum()
    index = {n["node_id"]: i for i, n in zip(np.flatnonzero(pruned.node_mask), data["nodes"], strict=True)}
    for link in data["links"]:
        assert link["weight"] == graph.adjacency[index[link["target"]], index[link["source"]]]
    G.plot(data, tmp_path / "graph.png", title="test")
    assert (tmp_path / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_prompts_and_unknown_features_raise(setup):
    model, params, tokens, tc, tc_params, graph = setup
    with pytest.raises(ValueError, match="one prompt"):
        G.attribute(model, params, tokens[None], tc, tc_params)
    with pytest.raises(KeyError, match="not active"):
        graph.feature_node(0, 1, N_FEATURES + 5)
    with pytest.raises(KeyError, match="exclude_first_position"):
        graph.feature_node(0, 0, 0)
    with pytest.raises(ValueError, match="node_threshold"):
        G.prune(graph, node_threshold=0.0)


# ---------------------------------------------------------------------------------------
# Hand-built graphs with known answers.


def _toy_graph(adjacency, n_features, n_layers, n_pos, probs):
    return G.AttributionGraph(
        adjacency=np.asarray(adjacency, np.float64),
        features=np.zeros((n_features, 3), int), activations=np.ones(n_features),
        tokens=np.zeros(n_pos, int), logit_tokens=np.arange(len(probs)),
        logit_probabilities=np.asarray(probs, np.float64), n_layers=n_layers,
        target_values=np.zeros(0), target_bias=np.zeros(0))


def test_scores_on_a_hand_built_graph():
    # Nodes: f0, e0, t0, logit. f0 <- t0 (2); logit <- f0 (3) and e0 (-1).
    adjacency = np.zeros((4, 4))
    adjacency[0, 2] = 2.0
    adjacency[3, 0], adjacency[3, 1] = 3.0, -1.0
    graph = _toy_graph(adjacency, 1, 1, 1, [1.0])
    normalized = G.normalize_matrix(adjacency)
    np.testing.assert_allclose(normalized[3], [0.75, 0.25, 0, 0])
    infl = G.influence(normalized, graph.logit_weights())
    np.testing.assert_allclose(infl, [0.75, 0.25, 0.75, 0.0])
    scores = G.graph_scores(graph)
    assert scores.replacement == pytest.approx(0.75 / (0.75 + 0.25))
    # (1 - error share) * (influence + w): f0 1*0.75, e0 1*0.25, t0 1*0.75, logit 0.75*1.
    assert scores.completeness == pytest.approx((0.75 + 0.25 + 0.75 + 0.75) / 2.75)


def test_influence_is_the_neumann_series_on_a_random_dag():
    rng = np.random.default_rng(0)
    a = np.tril(rng.normal(size=(9, 9)), k=-1)  # strictly lower triangular: a DAG
    normalized = G.normalize_matrix(a)
    w = np.zeros(9)
    w[-2:] = [0.3, 0.7]
    series, power = np.zeros(9), w.copy()
    for _ in range(9):
        power = power @ normalized
        series += power
    np.testing.assert_allclose(G.influence(normalized, w), series, atol=1e-12)


def test_pruning_keeps_the_influential_path():
    # Nodes: f0, f1, e0, t0, logit. Both features read t0; logit <- f0 (9), f1 (1).
    adjacency = np.zeros((5, 5))
    adjacency[0, 3] = adjacency[1, 3] = 1.0
    adjacency[4, 0], adjacency[4, 1] = 9.0, 1.0
    graph = _toy_graph(adjacency, 2, 1, 1, [1.0])
    pruned = G.prune(graph, node_threshold=0.8, edge_threshold=0.98)
    np.testing.assert_allclose(pruned.influence, [0.9, 0.1, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(pruned.node_mask, [True, False, False, True, True])
    edges = {(int(t), int(s)) for t, s in zip(*np.nonzero(pruned.edge_mask), strict=True)}
    assert edges == {(0, 3), (4, 0)}
    everything = G.prune(graph, node_threshold=1.0, edge_threshold=1.0)
    np.testing.assert_array_equal(everything.node_mask, [True, True, False, True, True])


def test_cumulative_threshold_keeps_the_largest_scores_up_to_the_share():
    scores = np.array([5.0, 1.0, 3.0, 1.0])  # shares 0.5, 0.8, 0.9, 1.0 in sorted order
    assert G.cumulative_threshold(scores, 0.5) == 5.0
    assert G.cumulative_threshold(scores, 0.6) == 3.0
    assert G.cumulative_threshold(scores, 0.85) == 1.0
    assert G.cumulative_threshold(np.zeros(3), 0.8) == np.inf


def test_select_logits_takes_the_fewest_tokens_reaching_the_probability():
    probs = np.array([0.05, 0.6, 0.3, 0.05])
    ids, p = G.select_logits(jnp.log(jnp.asarray(probs)), desired_probability=0.85)
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_allclose(p, [0.6, 0.3], rtol=1e-6)
    ids, _ = G.select_logits(jnp.log(jnp.asarray(probs)), max_logits=1)
    np.testing.assert_array_equal(ids, [1])


def test_first_order_effects_with_frozen_norms_and_patterns_match_last_layer_edges(setup):
    model, params, _, _, tc_params, graph = setup
    last = np.flatnonzero((graph.features[:, 0] == 1) & (graph.features[:, 1] == T_LEN - 1))
    node = int(last[0])
    delta = [-float(graph.activations[node])]
    frozen = G.first_order_logit_effects(model, params, graph, tc_params, [node], delta,
                                         freeze_norms=True, freeze_patterns=True)
    direct = G.predicted_logit_effects(graph, [node], delta, propagate=False)
    np.testing.assert_allclose(frozen, direct, atol=1e-4 * np.abs(direct).max())
    # Unfrozen, the first-order effect is the small-step limit of the real steered model.
    real = G.first_order_logit_effects(model, params, graph, tc_params, [node], delta)
    step = G.actual_logit_effects(model, params, graph, tc_params, [node], [1e-2 * delta[0]])
    np.testing.assert_allclose(1e-2 * real, step, rtol=2e-2, atol=1e-6)
