"""Rectified flow checked against closed forms: the Euler sampler driven by the exact
velocity of a two-point mixture and of a Gaussian reproduces the data (float64 reference),
the flow loss of the exact velocity is the analytic irreducible loss (time convention),
classifier-free guidance and label dropout, and a tiny DiT trained on two images
regenerates them class by class."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate
from flax import linen as nn
from sklearn.datasets import load_digits

from mechinterp.models.diffusion import euler_sample, flow_loss
from mechinterp.models.dit import DiT
from mechinterp.train.flow import dropped_labels

POINTS = np.array([[1.0, -0.5, 0.25], [-1.0, 0.5, 0.75]])
MU, S = np.array([0.5, -1.0, 2.0]), 0.3


def mixture_velocity(x, t, points, xp=jnp):
    """E[eps - x_0 | x_t = x] for x_0 uniform on ``points``: ``(x - E[x_0 | x]) / t``."""
    tb = t[:, None]
    logw = -((x[:, None] - (1 - tb[..., None]) * points[None]) ** 2).sum(-1) / (2 * tb ** 2)
    w = xp.exp(logw - logw.max(-1, keepdims=True))
    return (x - (w / w.sum(-1, keepdims=True)) @ points) / tb


def gaussian_velocity(x, t, xp=jnp):
    """The same for x_0 ~ N(MU, S^2 I): E[x_0 | x_t] is linear in x_t."""
    tb = t[:, None]
    gain = (1 - tb) * S ** 2 / ((1 - tb) ** 2 * S ** 2 + tb ** 2)
    return (x - (MU + gain * (x - (1 - tb) * MU))) / tb


class Exact(nn.Module):
    """The exact velocity as a model: ``y`` picks one point, ``y = 2`` (null) the mixture."""

    data: str
    flip: bool = False   # read the time backwards (a wrong convention)

    @nn.compact
    def __call__(self, x, t, y=None):
        t = 1 - t if self.flip else t
        if self.data == "gaussian":
            return gaussian_velocity(x, t)
        points = jnp.asarray(POINTS, x.dtype)
        if y is None:
            return mixture_velocity(x, t, points)
        one = (x - points[jnp.minimum(y, 1)]) / t[:, None]
        return jnp.where((y == 2)[:, None], mixture_velocity(x, t, points), one)


def reference_euler(velocity, z, n):
    """The Euler loop in float64 numpy."""
    x = np.asarray(z, np.float64)
    for k in range(n):
        x = x - velocity(x, np.full(len(x), 1 - k / n)) / n
    return x


@pytest.fixture(scope="module")
def z():
    return np.random.default_rng(0).normal(size=(4000, 3)).astype(np.float32)


def test_euler_with_exact_velocity_reproduces_two_point_mixture(z):
    out, _ = euler_sample(Exact("mixture"), {}, z, 50)
    ref = reference_euler(lambda x, t: mixture_velocity(x, t, POINTS, np), z, 50)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    dist = np.linalg.norm(np.asarray(out)[:, None] - POINTS[None], axis=-1)
    assert dist.min(1).max() < 1e-4        # every sample lands on a data point
    share = (dist.argmin(1) == 0).mean()   # ... half on each: within 3 binomial sd
    assert abs(share - 0.5) < 3 * np.sqrt(0.25 / len(z))


def test_euler_with_exact_velocity_transports_gaussian(z):
    """The exact ODE maps noise z to MU + S z; Euler's error is O(1 / n_steps)."""
    errors = []
    for n in (20, 80):
        out, _ = euler_sample(Exact("gaussian"), {}, z, n)
        np.testing.assert_allclose(out, reference_euler(
            lambda x, t: gaussian_velocity(x, t, np), z, n), atol=1e-4)
        errors.append(np.abs(np.asarray(out, np.float64) - (MU + S * z)).max())
    assert errors[1] < 0.04 and errors[0] / errors[1] > 3.5   # first order: 4x for 4x steps


def test_flow_loss_of_exact_velocity_is_the_irreducible_loss(z):
    """E_t Var(eps - x_0 | x_t) in closed form; a flipped time convention costs more."""
    def conditional_var(t):
        var_u, var_x, cov = 1 + S ** 2, (1 - t) ** 2 * S ** 2 + t ** 2, t - (1 - t) * S ** 2
        return var_u - cov ** 2 / var_x

    expected, _ = scipy.integrate.quad(conditional_var, 0, 1)
    rng = np.random.default_rng(1)
    x0 = (MU + S * rng.normal(size=(200_000, 3))).astype(np.float32)
    eps = rng.normal(size=x0.shape).astype(np.float32)
    t = rng.uniform(0.001, 0.999, size=len(x0)).astype(np.float32)
    loss = float(flow_loss(Exact("gaussian"), {}, x0, eps, t))
    assert loss == pytest.approx(expected, rel=0.01)
    assert float(flow_loss(Exact("gaussian", flip=True), {}, x0, eps, t)) > 2 * expected


def test_classifier_free_guidance_and_label_dropout(z):
    z = z[:256]
    y = np.arange(len(z)) % 2
    null = np.full_like(y, 2)
    w, n = 1.5, 10
    out, _ = euler_sample(Exact("mixture"), {}, z, n, y=y, guidance=w,
                          null_kwargs={"y": null})

    def guided(x, t):
        v_u = mixture_velocity(x, t, POINTS, np)
        return v_u + w * ((x - POINTS[y]) / t[:, None] - v_u)

    np.testing.assert_allclose(out, reference_euler(guided, z, n), atol=1e-4)
    plain, _ = euler_sample(Exact("mixture"), {}, z, n, y=y)
    np.testing.assert_allclose(plain, np.broadcast_to(POINTS[y], z.shape), atol=1e-5)
    unguided, _ = jax.jit(lambda w: euler_sample(Exact("mixture"), {}, z, n, y=y, guidance=w,
                                                 null_kwargs={"y": null}))(1.0)  # traced w
    np.testing.assert_allclose(unguided, plain, atol=1e-5)
    with pytest.raises(ValueError, match="null_kwargs"):
        euler_sample(Exact("mixture"), {}, z, n, y=y, guidance=w)
    with pytest.raises(ValueError, match="null_kwargs"):
        euler_sample(Exact("mixture"), {}, z, n, y=y, guidance=w, null_kwargs={"cond": y})
    shapes = jax.eval_shape(DiT(n_classes=10, null_class=True).init, jax.random.key(0),
                            jnp.zeros((1, 8, 8, 1)), jnp.ones(1), jnp.zeros(1, jnp.int32))
    assert shapes["params"]["class_embed"]["embedding"].shape == (11, 32)  # + the null row
    batch = {"label": np.zeros(5000, np.int32), "noise_seed": np.arange(5000, dtype=np.uint32)}
    dropped = np.asarray(dropped_labels(batch, 0.1, 10))
    assert set(np.unique(dropped)) == {0, 10}
    assert abs((dropped == 10).mean() - 0.1) < 3 * np.sqrt(0.09 / 5000)
    np.testing.assert_array_equal(dropped, dropped_labels(batch, 0.1, 10))  # seeded


def test_tiny_dit_trained_on_two_images_regenerates_them():
    """Two digits, one class each: the flow loss (Adam, plain loop) and the Euler sampler
    must give back the image of the class asked for, from any noise."""
    images = (load_digits().images[[0, 1]] / 16 * 2 - 1)[..., None].astype(np.float32)
    model = DiT(image_size=8, patch_size=2, d_model=32, n_layers=1, n_heads=2, d_mlp=64,
                n_classes=2, freq_dim=32, scan_layers=False)
    params = model.init(jax.random.key(0), images, jnp.ones(2), jnp.arange(2))["params"]
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state, key):
        k_y, k_eps, k_t = jax.random.split(key, 3)
        y = jax.random.randint(k_y, (64,), 0, 2)
        x = jnp.asarray(images)[y]
        grads = jax.grad(lambda p: flow_loss(model, p, x, jax.random.normal(k_eps, x.shape),
                                             jax.random.uniform(k_t, (64,)), y=y))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for key in jax.random.split(jax.random.key(1), 150):
        params, state = step(params, state, key)
    y = np.array([0, 1] * 4, np.int32)
    noise = np.random.default_rng(1).normal(size=(8, 8, 8, 1)).astype(np.float32)
    out, _ = euler_sample(model, params, noise, 20, y=y)
    rms = np.sqrt(np.mean((np.asarray(out) - images[y]) ** 2, axis=(1, 2, 3)))
    assert rms.max() < 0.1    # pixels in [-1, 1]; the other digit is at rms ~0.7
    assert np.sqrt(np.mean((images[0] - images[1]) ** 2)) > 0.5
