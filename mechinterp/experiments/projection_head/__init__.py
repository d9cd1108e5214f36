"""Investigating the benefits of projection head for representation learning (Xue et al.,
2024), small.

A CNN encoder (its linear output layer gives the representation ``h``) is trained with
InfoNCE (SimCLR's NT-Xent, two augmented views per image) on procedural shapes, with the
loss on ``h`` itself (no head), after a learned MLP projection head ``z = g(h)``, or after
a fixed re-weighting ``z_i = kappa^(i/(d-1)) h_i`` (our reading of the paper's
non-learned alternative). Per training seed: feature weighting by depth (effective rank of
the pooled features at every layer, over their width: lower = more unequal), and linear
probes (scikit-learn logistic regression on shape labels) on ``h`` and ``z``, on the
training distribution's test images and on a shifted test set (other textures, other
palette).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mechinterp import capture
from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.experiments.projection_head import report
from mechinterp.models import stack_layers
from mechinterp.models.cnn import CNN
from mechinterp.train.shapes import CLASSES, SHAPES, build_shapes, class_id

HEADS = ("none", "mlp", "fixed")


class Contrastive(nn.Module):
    """``images -> (h, z)``: the encoder's representation and the head's output."""

    width: int
    n_layers: int
    head: str
    kappa: float = 0.1

    @nn.compact
    def __call__(self, images):
        h = CNN(n_classes=self.width, width=self.width, n_layers=self.n_layers, norm=False,
                scan_layers=False, name="encoder")(images)
        if self.head == "mlp":
            z = nn.Dense(self.width, name="proj_out")(
                nn.relu(nn.Dense(self.width, name="proj_in")(h)))
        elif self.head == "fixed":
            z = h * self.kappa ** (jnp.arange(self.width) / max(self.width - 1, 1))
        else:
            z = h
        return h, z


def load_domains(config, data_dir) -> dict:
    """``{"train": (x, y), "test": (x, y), "shifted": (x, y)}``, y = shape index."""
    d = config.data
    domains = {"train": (d.textures, d.palette), "shifted": (d.shifted_textures,
                                                              d.shifted_palette)}
    out = {}
    for name, (textures, palette) in domains.items():
        classes = [class_id(s, t, palette) for s in SHAPES[:d.n_shapes] for t in textures]
        builder = build_shapes(data_dir=data_dir, classes=classes, size=d.size,
                               n_train=d.n_train, n_test=d.n_test, noise=d.noise,
                               seed=config.seed)
        for split in ("train", "test") if name == "train" else ("test",):
            source = builder.as_data_source(split)
            rows = source.__getitems__(range(len(source)))
            x = np.stack([r["inputs"] for r in rows])
            y = np.array([SHAPES.index(CLASSES[int(r["class_id"])][0]) for r in rows])
            out["shifted" if name == "shifted" else split] = (x, y)
    return out


def augment(key, x):
    """A random one-pixel shift (crop of the padded image), brightness and colour jitter,
    and pixel noise, independently per image."""
    k_shift, k_bright, k_colour, k_noise = jax.random.split(key, 4)
    n, size = x.shape[0], x.shape[1]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    offsets = jax.random.randint(k_shift, (n, 2), 0, 3)
    x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0),
                                                      (size, size, img.shape[-1])))(padded,
                                                                                    offsets)
    x = x * jax.random.uniform(k_bright, (n, 1, 1, 1), minval=0.7, maxval=1.3)
    x = x * jax.random.uniform(k_colour, (n, 1, 1, x.shape[-1]), minval=0.8, maxval=1.2)
    return x + 0.05 * jax.random.normal(k_noise, x.shape)


def nt_xent(z1, z2, temperature: float):
    """SimCLR's InfoNCE over 2N views: each view's positive is the other view of its
    image; the other 2N - 2 views are negatives."""
    z = jnp.concatenate([z1, z2])
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-8)
    logits = z @ z.T / temperature
    n = z1.shape[0]
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
    targets = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train(config, head: str, x, seed: int):
    model = Contrastive(config.model.width, config.model.n_layers, head, config.model.kappa)
    tx = optax.adam(config.train.learning_rate)
    t = config.train

    def loss(params, key, batch):
        k1, k2 = jax.random.split(key)
        _, z1 = model.apply({"params": params}, augment(k1, batch))
        _, z2 = model.apply({"params": params}, augment(k2, batch))
        return nt_xent(z1, z2, t.temperature)

    @jax.jit
    def step(params, opt_state, key, batch):
        value, grads = jax.value_and_grad(loss)(params, key, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = jax.jit(model.init, compiler_options=FAST_COMPILE)(jax.random.key(seed),
                                                                x[:1])["params"]
    opt_state = tx.init(params)
    rng, key, losses = np.random.default_rng(seed), jax.random.key(seed + 1), []
    for i in range(t.steps):
        batch = x[rng.choice(len(x), t.batch_size, replace=False)]
        params, opt_state, value = step(params, opt_state, jax.random.fold_in(key, i), batch)
        losses.append(value)
    return model, params, np.asarray(jnp.stack(losses))


def effective_rank(features) -> float:
    """``exp(entropy of the normalized squared singular values)`` of centred features,
    over their width: 1 = every direction equally weighted, 1/width = a single one."""
    f = np.asarray(features, np.float64)
    s = np.linalg.svd(f - f.mean(0), compute_uv=False) ** 2
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p + 1e-30))) / f.shape[1])


def representations(model, params, x) -> dict:
    """Pooled features at every layer of the encoder, then ``h`` and ``z``."""
    encoder = CNN(n_classes=model.width, width=model.width, n_layers=model.n_layers,
                  norm=False)
    _, cache = capture(encoder, stack_layers(params["encoder"]), x,
                       sites=["stem", "resid_post"])
    h, z = jax.jit(model.apply)({"params": params}, x)
    layers = {"stem": cache["stem"].mean(axis=(1, 2))}
    layers.update({f"block{i}": r.mean(axis=(1, 2)) for i, r in enumerate(cache["resid_post"])})
    return {**layers, "h": h, "z": z}


def probe(train_features, y, evaluations: dict) -> dict:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(np.asarray(train_features), y)
    return {name: float(clf.score(np.asarray(f), labels))
            for name, (f, labels) in evaluations.items()}


def analyse(model, params, data) -> dict:
    reps = {split: representations(model, params, x) for split, (x, _) in data.items()}
    out = {"effective_rank": {k: effective_rank(v) for k, v in reps["test"].items()}}
    for rep in ("h", "z"):
        out[f"probe_{rep}"] = probe(reps["train"][rep], data["train"][1], {
            split: (reps[split][rep], data[split][1]) for split in ("test", "shifted")})
    return out


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = load_domains(config, r.workdir / "data")
        per_head, losses = {}, {}
        for head in config.heads:
            runs = []
            for seed in kit.train_seeds(config):
                with r.phase(f"train/{head}"):
                    model, params, curve = train(config, head, data["train"][0], seed)
                with r.phase(f"analysis/{head}"):
                    runs.append(analyse(model, params, data))
                losses.setdefault(head, []).append(curve)
            per_head[head] = {"per_seed": runs, "summary": kit.aggregate(runs)}
        with r.phase("report"):
            report.figures(r, per_head, losses)
            r.write_results({"heads": per_head},
                            {f"loss/{k}": np.stack(v) for k, v in losses.items()})
            r.write_report(report.markdown(config, per_head, r.timings))
