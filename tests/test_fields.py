"""Field representations (models/fields.py) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp
from mechinterp.models.fields import Field


def _params(field, seed=0):
    """Random parameters of the right shapes (no compiled initializers: fast)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(field.init, jax.random.key(0), jnp.zeros((1, 2)))["params"]
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def _hash_reference(params, field, p):
    """Instant-NGP's multiresolution hash encoding, written out in numpy float64."""
    feats = []
    for l, r in enumerate(field.resolutions()):
        table = np.asarray(params[f"hash_{l}"], np.float64)
        dense = (r + 1) ** 2 <= field.table_size
        u = (p + 1) / 2 * r
        i0 = np.clip(np.floor(u), 0, r - 1).astype(np.int64)
        w = u - i0
        out = np.zeros((len(p), table.shape[1]))
        for dx in (0, 1):
            for dy in (0, 1):
                x, y = i0[:, 0] + dx, i0[:, 1] + dy
                idx = x * (r + 1) + y if dense else (x ^ (y * 2654435761)) % field.table_size
                wt = (w[:, 0] if dx else 1 - w[:, 0]) * (w[:, 1] if dy else 1 - w[:, 1])
                out += wt[:, None] * table[idx]
        feats.append(out)
    return np.concatenate(feats, 1)


def test_hash_encoding_matches_reference_and_every_site_is_reached():
    field = Field(kind="hash", levels=4, table_size=64, min_resolution=3, growth=2.0,
                  d_feature=8, head_width=8)
    assert [(r + 1) ** 2 <= 64 for r in field.resolutions()] == [True, True, False, False]
    p = np.random.default_rng(0).uniform(-1, 1, (50, 2))
    params = _params(field)
    out, cache = mechinterp.capture(field, params, jnp.asarray(p, jnp.float32))
    np.testing.assert_allclose(cache["encoding"], _hash_reference(params, field, p),
                               atol=1e-5)
    assert set(cache) == set(Field.SITES) - {"encoder.hidden"}  # that one is the MLP's
    assert out.shape == (50, 4) and float(out[:, 0].min()) >= 0
    assert 0 <= float(out[:, 1:].min()) and float(out[:, 1:].max()) <= 1


def test_grid_interpolates_linear_functions_exactly_and_mlp_encoding_matches_numpy():
    r = 5
    field = Field(kind="grid", grid_resolution=r, grid_features=2)
    params = _params(field)
    v = np.linspace(-1, 1, r + 1)
    gx, gy = np.meshgrid(v, v, indexing="ij")
    params = {**params, "grid": jnp.asarray(np.stack([2 * gx - gy, gx * 0 + 0.5], -1)
                                            .reshape(-1, 2), jnp.float32)}
    p = np.random.default_rng(1).uniform(-1, 1, (40, 2))
    _, cache = mechinterp.capture(field, params, jnp.asarray(p, jnp.float32),
                                  sites=["encoding"])
    np.testing.assert_allclose(cache["encoding"][:, 0], 2 * p[:, 0] - p[:, 1], atol=1e-5)

    mlp = Field(kind="mlp", n_freqs=3, width=8, depth=2)
    params = _params(mlp)
    _, cache = mechinterp.capture(mlp, params, jnp.asarray(p, jnp.float32),
                                  sites=["encoding", "encoder.hidden"])
    ang = np.concatenate([p * (2 ** k) * np.pi for k in range(3)], 1)
    np.testing.assert_allclose(cache["encoding"], np.concatenate([p, np.sin(ang),
                                                                  np.cos(ang)], 1), atol=1e-5)
    assert cache["encoder.hidden"].shape == (2, 40, 8)


def test_bad_field_inputs_name_the_problem():
    with pytest.raises(ValueError, match="kind='nerf'"):
        Field(kind="nerf")
    with pytest.raises(ValueError, match=r"coords \(batch, 2\)"):
        jax.eval_shape(Field().init, jax.random.key(0), jnp.zeros((3, 3)))


def test_field_site_table_matches_declarations():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "sites.md").read_text()
    section = text.split("## Fields", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
    assert {n: (a.strip(), m.strip()) for n, a, m in rows} == {
        n: (", ".join(s.axes), s.meaning) for n, s in Field.SITES.items()}
