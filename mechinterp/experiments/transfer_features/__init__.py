"""How transferable are features in deep neural networks? (Yosinski et al., 2014), small.

Per task pair (``data.splits``: digits 0-4 vs 5-9, procedural shapes at near / far task
distance) and training seed: base CNNs on A and on B; for each depth n, the first n layers
copied from baseA (AnB) or baseB (BnB), frozen or fine-tuned (+), or random and frozen
(random features), the rest re-initialized and trained on B; test accuracy on B. Then a
network trained on A and B together, mean-ablated channel by channel with the sweep engine
on A's and on B's test images, locates A- and B-specific channels by layer.

Training: ~200 small networks per run share one compiled Adam step
(:class:`~mechinterp.experiments.kit.classifier.Classifier`; frozen layers are a mask
argument, no recompilation; docs/decisions.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import Intervention, capture
from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import Classifier
from mechinterp.experiments.transfer_features import report
from mechinterp.models import stack_layers
from mechinterp.models.cnn import CNN
from mechinterp.sweep import sweep
from mechinterp.train.digits import build_digits
from mechinterp.train.shapes import build_shapes, task_pair

CONDITIONS = ("AnB", "AnB+", "BnB", "BnB+", "random")


def _arrays(builder, split):
    source = builder.as_data_source(split)
    records = source.__getitems__(range(len(source)))
    x = np.stack([r["inputs"] for r in records]).astype(np.float32)
    return x, np.array([r["label"] for r in records], np.int32)


def load_tasks(config, split: str, data_dir) -> dict:
    """``{"A": (x_train, y_train, x_test, y_test), "B": ...}``, labels 0..4 in each task."""
    d = config.data
    if split == "digits":
        builder = build_digits(data_dir=data_dir, seed=config.seed)
        parts = [_arrays(builder, s) for s in ("train", "test")]
        tasks = {}
        for name, low in (("A", 0), ("B", 5)):
            out = []
            for x, y in parts:
                keep = (y >= low) & (y < low + 5)
                out += [x[keep].reshape(-1, 8, 8, 1), y[keep] - low]
            tasks[name] = tuple(out)
        return tasks
    pair = dict(zip("AB", task_pair(split, config.seed)))
    return {name: sum((_arrays(build_shapes(data_dir=data_dir, classes=classes, size=d.size,
                                            n_train=d.n_train, n_test=d.n_test,
                                            noise=d.noise, seed=config.seed), s)
                       for s in ("train", "test")), ())
            for name, classes in pair.items()}


def layer_names(model: CNN) -> list[str]:
    """The transferable layers in order: the stem, then each residual block."""
    return ["stem_conv"] + [f"layers_{i}" for i in range(model.n_layers)]


def transfer_curves(trainer: Classifier, tasks: dict, seed: int) -> dict:
    """Test accuracy on B of every condition at each depth n, plus the base networks."""
    xa, ya, xa_test, ya_test = tasks["A"]
    xb, yb, xb_test, yb_test = tasks["B"]
    base_a, _ = trainer.fit(trainer.init(1000 * seed + 1, xa), xa, ya, seed)
    base_b, _ = trainer.fit(trainer.init(1000 * seed + 2, xb), xb, yb, seed + 1)
    random = trainer.init(1000 * seed + 3, xb)
    names = layer_names(trainer.model)
    out = {"baseA_on_A": trainer.accuracy(base_a, xa_test, ya_test),
           "baseB": trainer.accuracy(base_b, xb_test, yb_test),
           **{c: [] for c in CONDITIONS}}
    for n in range(1, len(names) + 1):
        for condition in CONDITIONS:
            source = {"A": base_a, "B": base_b, "r": random}[condition[0]]["params"]
            fresh = trainer.init(1000 * seed + 10 + n, xb)["params"]
            start = {k: (source[k] if k in names[:n] else v) for k, v in fresh.items()}
            frozen = () if condition.endswith("+") else names[:n]
            trained, _ = trainer.fit({"params": start}, xb, yb, seed + 2 + n, frozen)
            out[condition].append(trainer.accuracy(trained, xb_test, yb_test))
    return out


def channel_specificity(trainer: Classifier, tasks: dict, seed: int, chunk_size: int) -> dict:
    """A network trained on A and B (10 classes) with each (layer, channel) of
    ``conv.hidden`` mean-ablated: the drop in correct-class log-probability on A's and B's
    test images, and specificity ``(dA - dB) / (|dA| + |dB|)`` per channel."""
    xa, ya, xa_test, ya_test = tasks["A"]
    xb, yb, xb_test, yb_test = tasks["B"]
    x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb + 5])
    joint_model = trainer.model.clone(n_classes=10)
    joint = Classifier(joint_model, steps=trainer.steps, batch_size=trainer.batch_size,
                       learning_rate=trainer.learning_rate)
    variables, _ = joint.fit(joint.init(1000 * seed + 4, x), x, y, seed)
    params = variables["params"]
    model = joint_model.clone(scan_layers=True)
    stacked = stack_layers(params)
    drops = {}
    for task, (images, labels) in {"A": (xa_test, ya_test), "B": (xb_test, yb_test + 5)}.items():
        labels = jnp.asarray(labels)

        def metric(logits, labels=labels):
            logp = jax.nn.log_softmax(logits)
            return jnp.take_along_axis(logp, labels[:, None], 1).mean()

        _, cache = capture(model, stacked, images, sites=["conv.hidden"])
        hidden = cache["conv.hidden"]  # (layer, batch, height, width, channel)
        mean = jnp.broadcast_to(hidden.mean(axis=(1, 2, 3), keepdims=True), hidden.shape)
        grid = sweep(model, stacked, (images,), "conv.hidden", ("layer", "channel"), mean,
                     metric, make_intervention=lambda src, mask: Intervention.mean(src, mask),
                     chunk_size=chunk_size, progress=False)
        clean = float(metric(model.apply({"params": stacked}, images)))
        drops[task] = clean - grid.values
    spec = (drops["A"] - drops["B"]) / (np.abs(drops["A"]) + np.abs(drops["B"]) + 1e-6)
    return {"drop_A": drops["A"], "drop_B": drops["B"], "specificity": spec,
            "joint_accuracy": joint.accuracy(variables, np.concatenate([xa_test, xb_test]),
                                             np.concatenate([ya_test, yb_test + 5]))}


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        model = CNN(n_classes=5, width=config.model.width, n_layers=config.model.n_layers,
                    norm=False, scan_layers=False)
        t = config.train
        trainer = Classifier(model, steps=t.steps, batch_size=t.batch_size,
                             learning_rate=t.learning_rate)
        per_split, arrays = {}, {}
        for split in config.data.splits:
            with r.phase(f"{split}/data"):
                tasks = load_tasks(config, split, r.workdir / "data")
            curves, ablations = [], []
            for seed in kit.train_seeds(config):
                with r.phase(f"{split}/transfer"):
                    curves.append(transfer_curves(trainer, tasks, seed))
                if config.analysis.ablation:
                    with r.phase(f"{split}/ablation"):
                        ablations.append(channel_specificity(trainer, tasks, seed,
                                                             config.analysis.chunk_size))
            per_split[split] = {"per_seed": curves, "curves": kit.aggregate(curves)}
            if ablations:
                for key in ("drop_A", "drop_B", "specificity"):
                    arrays[f"{split}/{key}"] = np.stack([a[key] for a in ablations])
                per_split[split]["ablation"] = report.specificity_summary(
                    arrays[f"{split}/specificity"], [a["joint_accuracy"] for a in ablations])
        with r.phase("report"):
            report.figures(r, per_split, arrays, layer_names(model))
            r.write_results({"splits": per_split, "layers": layer_names(model)}, arrays)
            r.write_report(report.markdown(config, per_split, r.timings))
