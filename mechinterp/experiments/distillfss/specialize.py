"""Training and evaluation pieces of the DistillFSS reproduction: one masked Adam step per
model kind (compiled once, reused for every class), episodic teacher training, the
per-class specialization (distil, fine-tune, baseline), mIoU and test-time cost."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.models.fewshot_seg import (FSSTeacher, LinearSegmenter, encode,
                                           student_from_support)
from mechinterp.train import fewshot_seg


def iou_counts(logits, masks) -> tuple[float, float]:
    """``(intersection, union)`` of the predicted foreground (logit > 0) and ``masks``."""
    pred, truth = np.asarray(logits) > 0, np.asarray(masks, bool)
    return float((pred & truth).sum()), float((pred | truth).sum())


def miou(counts: dict) -> float:
    """Mean over classes of IoU = sum of intersections / sum of unions (over a class's
    queries and episodes), the usual few-shot segmentation mIoU; ``counts``:
    ``{class: [(intersection, union), ...]}``."""
    per_class = [sum(i for i, _ in c) / max(sum(u for _, u in c), 1.0) for c in counts.values()]
    return float(np.mean(per_class))


class Stepper:
    """One compiled Adam step of a per-pixel sigmoid cross-entropy (hard or soft targets)
    for ``model``; ``mask`` (0/1 per top-level parameter entry) freezes parts, ``scale``
    multiplies the learning rate, so distillation and fine-tuning share the compilation."""

    def __init__(self, model, learning_rate: float, method=None, compiler_options=None):
        self.tx = optax.adam(learning_rate)
        apply = functools.partial(model.apply, method=method)

        def loss(params, *inputs_and_target):
            *inputs, target = inputs_and_target
            logits = apply({"params": params}, *inputs)
            return optax.sigmoid_binary_cross_entropy(logits, target).mean()

        def step(params, opt_state, mask, scale, *batch):
            value, grads = jax.value_and_grad(loss)(params, *batch)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u, m: u * m * scale, updates, mask)
            return optax.apply_updates(params, updates), opt_state, value

        self._step = jax.jit(step, compiler_options=compiler_options)
        self.apply = jax.jit(apply, compiler_options=compiler_options)

    def fit(self, params, batches, *, steps: int, trainable=None, scale: float = 1.0):
        """``params`` after ``steps`` steps on ``batches(step) -> (inputs..., target)``;
        ``trainable``: the top-level entries to train (default all)."""
        mask = {k: jax.tree.map(lambda _, k=k: jnp.float32(trainable is None or k in trainable),
                                v) for k, v in params.items()}
        opt_state, losses = self.tx.init(params), []
        for step in range(steps):
            params, opt_state, value = self._step(params, opt_state, mask, jnp.float32(scale),
                                                  *batches(step))
            losses.append(value)
        return params, np.asarray(jnp.stack(losses)) if losses else np.zeros(0)


def compile_options(config):
    """XLA's unoptimized CPU compile where ``config.fast_compile`` (tiny runs: compiling
    dominates them)."""
    return FAST_COMPILE if config.fast_compile else None


def train_teacher(config, source, seed: int):
    """The teacher trained on episodes of the source domain's classes; ``(model, params,
    losses)``."""
    m, t = config.model, config.teacher
    teacher = FSSTeacher(m.width, m.n_layers, m.pool, m.hidden)
    images, masks = source
    rng = np.random.default_rng(seed)
    first = fewshot_seg.episodes(images, masks, batch=1, shots=t.shots, rng=rng)
    params = teacher.init(jax.random.key(seed), first["query"], first["support"],
                          first["support_mask"])["params"]
    stepper = Stepper(teacher, t.learning_rate, compiler_options=compile_options(config))

    def batches(_):
        e = fewshot_seg.episodes(images, masks, batch=t.batch_size, shots=t.shots, rng=rng)
        return e["query"], e["support"], e["support_mask"], e["query_mask"].astype(np.float32)

    params, losses = stepper.fit(params, batches, steps=t.steps)
    return teacher, params, losses


class Specializer:
    """Turns a trained teacher and K shots of a target class into the four predictors of
    the report (teacher with supports, distilled student, fine-tuned student, linear
    baseline) and scores each on the class's test queries."""

    def __init__(self, config, teacher, params):
        self.config, self.teacher, self.params = config, teacher, params
        options = compile_options(config)
        self.teacher_apply = jax.jit(teacher.apply, compiler_options=options)
        self.encode = jax.jit(functools.partial(encode, teacher), compiler_options=options)
        self._steppers = {}

    def _stepper(self, kind, model):
        if kind not in self._steppers:
            self._steppers[kind] = Stepper(model, self.config.specialize.learning_rate,
                                           method="from_features",
                                           compiler_options=compile_options(self.config))
        return self._steppers[kind]

    def teacher_logits(self, queries, shots, shot_masks):
        n = len(queries)
        return self.teacher_apply({"params": self.params}, queries,
                                  np.broadcast_to(shots, (n,) + shots.shape),
                                  np.broadcast_to(shot_masks, (n,) + shot_masks.shape))

    def run(self, shots, shot_masks, queries, query_masks, rng):
        """``({predictor: (intersection, union)} on the queries, training losses, (student,
        its fine-tuned params))``. The encoder stays frozen: students and baseline train
        on its features of the augmented shots."""
        s = self.config.specialize
        aug_x, aug_m = fewshot_seg.augment(shots, shot_masks, s.n_aug, rng)
        soft = np.asarray(jax.nn.sigmoid(self.teacher_logits(aug_x, shots, shot_masks)))
        hard = aug_m.astype(np.float32)
        feats, qfeats = self.encode(self.params, aug_x), self.encode(self.params, queries)
        steps = max(s.distill_steps, s.finetune_steps, s.baseline_steps)
        order = np.concatenate([rng.permutation(s.n_aug)
                                for _ in range(steps * s.batch_size // s.n_aug + 1)])

        def batches(target):
            def get(step):
                idx = order[step * s.batch_size:(step + 1) * s.batch_size]
                return feats[idx], target[idx]
            return get

        out = {"teacher": iou_counts(self.teacher_logits(queries, shots, shot_masks),
                                     query_masks)}
        student, sparams = student_from_support(self.teacher, self.params, shots, shot_masks,
                                                n_keys=self.config.model.n_keys,
                                                seed=int(rng.integers(2**31)))
        head = {k: sparams[k] for k in ("class_layer", "decoder")}
        st = self._stepper("student", student)
        out["student_init"] = iou_counts(st.apply({"params": head}, qfeats), query_masks)
        head, distill_loss = st.fit(head, batches(soft), steps=s.distill_steps,
                                    trainable=("class_layer",))
        out["student"] = iou_counts(st.apply({"params": head}, qfeats), query_masks)
        ft, ft_loss = st.fit(head, batches(hard), steps=s.finetune_steps,
                             scale=s.finetune_scale)
        out["student_ft"] = iou_counts(st.apply({"params": ft}, qfeats), query_masks)
        m = self.config.model
        base = LinearSegmenter(m.width, m.n_layers, m.pool)
        bparams = {"head": base.init(jax.random.key(int(rng.integers(2**31))),
                                     queries[:1])["params"]["head"]}
        bt = self._stepper("baseline", base)
        bparams, base_loss = bt.fit(bparams, batches(hard), steps=s.baseline_steps)
        out["baseline_ft"] = iou_counts(bt.apply({"params": bparams}, qfeats), query_masks)
        losses = {"distill": distill_loss, "finetune": ft_loss, "baseline": base_loss}
        return out, losses, (student, {"encoder": self.params["encoder"], **ft})


def test_time_cost(config, specializer, student, student_params, queries, shots_by_k):
    """Per query: XLA's FLOP count (``cost_analysis`` of the compiled forward on one
    query) and wall seconds (best of ``cost.repeats`` on ``len(queries)`` queries)."""
    def measure(fn, *args):
        one = [a[:1] for a in args]
        run = jax.jit(fn, compiler_options=compile_options(config))
        flops = float((run.lower(*one).compile().cost_analysis() or {}).get("flops", 0))
        jax.block_until_ready(run(*args))
        best = np.inf
        for _ in range(config.cost.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(*args))
            best = min(best, time.perf_counter() - t0)
        return {"flops": flops, "seconds": best / len(queries)}

    out = {"student": measure(lambda q: student.apply({"params": student_params}, q), queries)}
    n = len(queries)
    for k, (shots, masks) in shots_by_k.items():
        out[f"teacher_{k}shot"] = measure(
            lambda q, s, m: specializer.teacher.apply({"params": specializer.params}, q, s, m),
            queries, np.broadcast_to(shots, (n,) + shots.shape),
            np.broadcast_to(masks, (n,) + masks.shape))
    return out
