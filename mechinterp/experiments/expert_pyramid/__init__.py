"""Expert Pyramid Tuning (METHODS.md item 9, form inferred) on multi-task digits; config in
``configs/expert_pyramid.py``.

A two-layer MLP is pretrained on upright scikit-learn digits (per seed). Its dense layers
become :class:`~mechinterp.models.pyramid.PyramidDense` layers, and the same frozen base is
tuned on four tasks at once (the digits rotated 45, 90, 180 degrees and mirrored; the task
index is an input): full fine-tuning (every base weight, no task index), a single LoRA (one
expert, kernel 1, of the pyramid's total rank: shared by all tasks) and the pyramid (experts of
kernels ``kernel_sizes`` from one shared seed, task router). Reported: mean test accuracy
over tasks, trainable parameters, and the pyramid merged per task into plain dense
weights (merged accuracy must equal unmerged).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from mechinterp.experiments import kit
from mechinterp.experiments.expert_pyramid.report import report_markdown
from mechinterp.models.pyramid import PyramidDense, merged_kernel
from mechinterp.train.digits import rotate_image, split_indices
from mechinterp.train.optim import make_optimizer

TASKS = {"rot45": lambda im: rotate_image(im, 45.0), "rot90": lambda im: np.rot90(im),
         "rot180": lambda im: np.rot90(im, 2), "mirror": np.fliplr}
METHODS = ("full", "lora", "pyramid")


class PyramidMLP(nn.Module):
    hidden: int
    n_tasks: int
    seed_rank: int
    kernel_sizes: tuple

    def setup(self):
        kw = dict(n_tasks=self.n_tasks, seed_rank=self.seed_rank, kernel_sizes=self.kernel_sizes)
        self.layers = [PyramidDense(64, self.hidden, **kw), PyramidDense(self.hidden, 10, **kw)]

    def __call__(self, x, task):
        return self.layers[1](nn.relu(self.layers[0](x, task)), task)


def make_data(config):
    """Upright train/test and the four tasks' train/test (x, y, task)."""
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target.astype(np.int32)
    train, test = split_indices(labels, config.data.test_fraction, config.seed)

    def task_set(rows):
        xs = [np.stack([fn(images[i]).reshape(64) for i in rows]) for fn in TASKS.values()]
        return (np.concatenate(xs).astype(np.float32), np.tile(labels[rows], len(TASKS)),
                np.repeat(np.arange(len(TASKS)), len(rows)).astype(np.int32))

    upright = {s: (images[r].reshape(-1, 64).astype(np.float32), labels[r],
                   np.zeros(len(r), np.int32)) for s, r in (("train", train), ("test", test))}
    return upright, {"train": task_set(train), "test": task_set(test)}


def fit(model, params, data, config, seed: int, *, tune_base: bool):
    """AdamW on the base weights (``tune_base``) or on everything else (the adapters); the
    other part is frozen (``train.optim.make_optimizer``'s freeze)."""
    frozen = r"^layers_\d+/(?!base/)" if tune_base else r"^layers_\d+/base/"
    tx = make_optimizer("adamw", config.learning_rate, freeze_patterns=[frozen])

    @jax.jit
    def step(params, state, x, y, task):
        def loss(p):
            logits = model.apply({"params": p}, x, task)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    x, y, task = data
    state, rng = tx.init(params), np.random.default_rng(seed)
    for _ in range(config.steps):
        i = rng.integers(0, len(x), config.batch_size)
        params, state = step(params, state, x[i], y[i], task[i])
    return params


def trainable_count(params, tune_base: bool) -> int:
    return int(sum(np.size(v) for p, v in jax.tree_util.tree_leaves_with_path(params)
                   if ("'base'" in jax.tree_util.keystr(p)) == tune_base))


def accuracy(model, params, data) -> float:
    x, y, task = data
    return float(np.mean(np.asarray(model.apply({"params": params}, x, task)).argmax(-1) == y))


def merged_accuracy(model: PyramidMLP, params, data) -> float:
    """Accuracy of plain dense layers with each task's pyramid baked into the kernels."""
    x, y, task = data
    right = 0
    for t in range(model.n_tasks):
        h = x[task == t]
        for i in range(2):
            p = params[f"layers_{i}"]
            layer = PyramidDense(*p["base"]["kernel"].shape, n_tasks=model.n_tasks,
                                 seed_rank=model.seed_rank, kernel_sizes=model.kernel_sizes)
            h = h @ merged_kernel(layer, p, t) + p["base"]["bias"]
            h = jax.nn.relu(h) if i == 0 else h
        right += int((np.asarray(h).argmax(-1) == y[task == t]).sum())
    return right / len(y)


def lora_rank(adapter) -> int:
    """The pyramid's total rank, sum over experts of ``seed_rank + k - 1``."""
    return sum(adapter.seed_rank + k - 1 for k in adapter.kernel_sizes)


def run_seed(config, upright, tasks, seed: int) -> dict:
    """Pretrain the base on upright digits, then tune it three ways on the four tasks."""
    a, n, x0 = config.adapter, len(TASKS), (upright["train"][0][:1], upright["train"][2][:1])
    models = {"full": PyramidMLP(config.hidden, n, a.seed_rank, tuple(a.kernel_sizes)),
              # the single LoRA has the pyramid's total rank: matched parameter counts
              "lora": PyramidMLP(config.hidden, n, lora_rank(a), (1,))}
    models["pyramid"] = models["full"]
    base = fit(models["full"], models["full"].init(jax.random.key(seed), *x0)["params"],
               upright["train"], config.pretrain, seed, tune_base=True)
    out = {"base": {"upright_acc": accuracy(models["full"], base, upright["test"]),
                    "tasks_acc": accuracy(models["full"], base, tasks["test"])}}
    for method in METHODS:
        model, tune_base = models[method], method == "full"
        params = model.init(jax.random.key(seed + 1), *x0)["params"]
        params = {k: {**v, "base": base[k]["base"]} for k, v in params.items()}
        tuned = fit(model, params, tasks["train"], config.tune, seed, tune_base=tune_base)
        out[method] = {"tasks_acc": accuracy(model, tuned, tasks["test"]),
                       "upright_acc": accuracy(model, tuned, upright["test"]),
                       "trainable": trainable_count(tuned, tune_base)}
        if method == "pyramid":
            out[method]["merged_tasks_acc"] = merged_accuracy(model, tuned, tasks["test"])
            gates = jax.nn.softmax(np.stack([tuned[f"layers_{i}"]["router"] for i in range(2)]))
            out[method]["router_gates"] = np.asarray(gates, np.float64).round(3).tolist()
    return out


@kit.job
def run(config, workdir) -> dict:
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            upright, tasks = make_data(config)
        per_seed = []
        for seed in kit.train_seeds(config):
            with r.phase(f"seed{seed}"):
                per_seed.append(run_seed(config, upright, tasks, seed))
        results = {"seeds": kit.train_seeds(config), "tasks": list(TASKS),
                   "per_seed": per_seed, "methods": kit.aggregate(
                       [{k: {m: v for m, v in row.items() if m != "router_gates"}
                         for k, row in s.items()} for s in per_seed])}
        with r.phase("report"):
            r.write_results(results)
            r.write_report(report_markdown(config, results, r.timings))
    return results
