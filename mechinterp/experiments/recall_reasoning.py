"""Recall vs reasoning circuits (METHODS.md item 1), end to end at small scale.

``mechinterp run configs/recall_reasoning.py`` runs :func:`run`:

1. **Puzzles.** One seeded :class:`~mechinterp.train.tasks.TaskMixture` of two tasks,
   built as a tfds dataset (:func:`mechinterp.train.data.build_synthetic`):

   - *recall* ``<recall> e5 r2 = e17``: a knowledge-base fact (entity, relation ->
     entity), memorized in training and never in the prompt. Train and test draw from the
     same facts (recall is memorization; there is nothing else to test).
   - *reasoning* ``<chain> s7 > s1 ; s3 > s7 ; ? s3 = s7 s1``: premises in the prompt
     (the shuffled edges of a chain of fresh symbols, optionally with ``distractors``
     chains); the answer needs ``length - 1`` (>= 2) in-context hops from the queried
     start. By default the intermediate steps are written out (``scratchpad``: ``s7``,
     then ``s1``); without it a tiny model did not learn the task in a CPU budget (0.27
     test accuracy after 1000 steps, 0.12 with a distractor chain after 2000). A
     ``holdout`` fraction of (start, end) combinations is test-only, so test accuracy
     measures generalization to unseen premise combinations.

   Each analysed item has a corrupted twin (:func:`make_twins`) that differs in exactly
   one token: recall changes the entity (to one whose fact has another answer);
   reasoning changes the last premise's object (``s7 > s1`` -> ``s7 > s4``, a symbol not
   in the prompt), so the answer changes and every other premise stays. Reasoning
   prompts end after the written-out intermediate steps (``? s3 = s7``), so the analysed
   prediction is the chain's final hop, read from the premises in context.
2. **Models.** A LLaMA-style decoder (no q/k/v bias, RoPE theta 1e4) and a Qwen2-style
   one (q/k/v bias, RoPE theta 1e6), same size, trained with
   :func:`mechinterp.train.loop.fit` in ``WORKDIR/models/<family>``; a second run finds
   the finished checkpoint there and reuses it instead of retraining.
3. **Patching** (denoising: clean activations into the corrupted run), per model and
   task, metric ``logit_diff(clean answer, corrupted answer)`` at the answer position,
   reported as the normalized effect PE = (m_patched - m_corrupt) / (m_clean -
   m_corrupt): layer x position grids of ``resid_pre``, ``attn_out``, ``mlp_out``; heads
   (``attn.z``, all positions); whole MLP layers (``mlp_out``, all positions); neurons
   (``mlp.hidden``, all positions).
4. **Circuits.** Components at two levels: *head/layer* (every attention head and every
   whole MLP layer) and *neuron* (every MLP neuron). A task's circuit at a level is chosen
   by :func:`select_circuit`: components sorted by PE, the smallest k whose positive
   effects sum to ``coverage`` of the total positive effect, capped at ``max_frac`` of the
   components (and at least 1).
5. **Ablation.** Each circuit is ablated (zero, and mean over the evaluated task's own
   prompts, per position) and top-1 accuracy at the answer position is measured on both
   tasks' test prompts; drop = unablated - ablated accuracy; selectivity = own-task drop -
   other-task drop. Controls: ``n_random`` random sets of the same size at the same level
   (seeded); their spread is the standard deviation across those seeds. Circuit drops come
   with a standard error over items.

Choices that are ours (the paper's exact forms are not in the abstract; *inferred*):
the tasks, the twin construction, "head/layer level" = heads plus whole MLP layers, the
coverage rule, mean ablation over the task's own prompts.

The run folder holds ``report.md``, ``results.json`` (accuracies, circuits, ablation
tables), ``results.npz`` (every PE grid, ``<family>/<task>/<grid>``), heatmaps
``patching_<family>_<task>.png``, ``dissociation.png``, ``models/<family>/`` (Orbax
checkpoints and training metrics) and ``data/`` (the tfds dataset).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from mechinterp.ablation import mean_activations, sweep_component_sets
from mechinterp.site_io import capture, list_sites
from mechinterp.components import component
from mechinterp.metrics import accuracy, logit_diff
from mechinterp.models import Decoder
from mechinterp.patching import normalized_effect
from mechinterp.train.checkpoint import Checkpointer
from mechinterp.train.config import default_config as default_train_config
from mechinterp.train.data import build_synthetic
from mechinterp.train.loop import decoder_config, fit
from mechinterp.train.tasks import SPLITS, TaskMixture, mixture_from_config, task_token
from mechinterp.train.tokenizer import BOS

TASKS = ("recall", "reasoning")
MIXTURE_NAMES = {"recall": "recall", "reasoning": "chain"}  # our name -> TaskMixture task
FAMILIES = {
    # LLaMA: no attention biases, RoPE theta 1e4. Qwen2: q/k/v biases, RoPE theta 1e6.
    "llama": {"qkv_bias": False, "rope_theta": 10_000.0},
    "qwen": {"qkv_bias": True, "rope_theta": 1_000_000.0},
}
LEVELS = ("head/layer", "neuron")
GRIDS = ("resid_pre", "attn_out", "mlp_out", "heads", "mlp_layers", "neurons")


# --------------------------------------------------------------------------- config

def default_config() -> ml_collections.ConfigDict:
    """The default experiment (finishes in about 10 minutes on a 2-core CPU)."""
    c = ml_collections.ConfigDict()
    c.job = "mechinterp.experiments.recall_reasoning:run"
    c.workdir = "runs/recall_reasoning"
    c.seed = 0
    c.preset = "default"  # "default" | "smoke" (CI) | "paper" (see configs/recall_reasoning.py)
    c.families = "llama,qwen"
    c.progress = True

    c.data = ml_collections.ConfigDict()
    c.data.n_entities = 24
    c.data.n_relations = 3
    c.data.n_symbols = 12
    c.data.chain_length = 3  # symbols per chain: length - 1 hops (>= 2)
    c.data.distractors = 0  # extra chains in the prompt
    c.data.scratchpad = True  # intermediate steps written out before the answer
    c.data.holdout = 0.2  # share of (start, end) chain combinations only in test
    c.data.chain_weight = 3.0  # sampling weight of reasoning vs recall (1) in training
    c.data.seq_len = 16
    c.data.num_train = 8192
    c.data.num_test = 512

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 64
    c.model.n_layers = 3
    c.model.n_heads = 4
    c.model.d_mlp = 128

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1200
    c.train.batch_size = 32
    c.train.learning_rate = 1e-2
    c.train.warmup_steps = 50

    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_items = 64  # twin pairs per task (test split)
    c.analysis.coverage = 0.8  # circuit: smallest k covering this share of positive PE
    c.analysis.max_frac = 0.25  # ... capped at this share of the level's components
    c.analysis.neuron_coverage = 0.8
    c.analysis.neuron_max_frac = 0.05
    c.analysis.n_random = 5  # random control sets per circuit
    c.analysis.methods = "zero,mean"

    c.paper = ml_collections.ConfigDict()
    c.paper.hf_path = ""  # a local Hugging Face folder (LLaMA / Qwen2), preset=paper
    return c


PRESETS = {
    "default": {},
    # the CI smoke test: one family, a few training steps, tiny grids (compile-bound)
    "smoke": {
        "families": "llama", "data.n_entities": 8, "data.n_relations": 2,
        "data.n_symbols": 8, "data.num_train": 256, "data.num_test": 64,
        "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2, "model.d_mlp": 16,
        "train.steps": 16, "train.warmup_steps": 2, "analysis.n_items": 16,
        "analysis.n_random": 2,
    },
    "paper": {},
}


def _get(config, key):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _set(config, key, value):
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with its preset applied; keys set away from their default win over the
    preset (so ``preset=smoke train.steps=40`` trains 40 steps)."""
    if config.preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {config.preset!r}")
    if config.preset == "paper":
        raise ValueError(
            "preset=paper runs on a real checkpoint and is not automated in this job: the "
            "puzzles are in a synthetic word vocabulary. The steps are in the docstring of "
            "configs/recall_reasoning.py (load_hf, natural-language twins, the same "
            "analysis functions of mechinterp.experiments.recall_reasoning)."
        )
    resolved = ml_collections.ConfigDict(config.to_dict())
    defaults = default_config()
    for key, value in PRESETS[config.preset].items():
        if _get(config, key) == _get(defaults, key):
            _set(resolved, key, value)
    return resolved


def make_mixture(config) -> TaskMixture:
    d = config.data
    return mixture_from_config(
        {"recall": {},
         "chain": {"n_symbols": d.n_symbols, "length": d.chain_length, "scratchpad": d.scratchpad,
                   "holdout": d.holdout, "distractors": d.distractors,
                   "weight": d.chain_weight}},
        knowledge={"n_entities": d.n_entities, "n_relations": d.n_relations},
        seq_len=d.seq_len, seed=config.seed)


# --------------------------------------------------------------------------- puzzles

@dataclasses.dataclass
class Twins:
    """``n`` prompt pairs of one task, all of one length; the answer is predicted at the
    last position. ``changed`` is the one position where ``clean`` and ``corrupt``
    differ; ``words`` are the first clean prompt's words (for plot labels)."""

    task: str
    clean: np.ndarray  # (n, length) int32
    corrupt: np.ndarray
    clean_answer: np.ndarray  # (n,) int32 token ids
    corrupt_answer: np.ndarray
    changed: np.ndarray  # (n,) int32
    words: list[str]


def _task(mixture: TaskMixture, name: str):
    for task, _ in mixture.tasks:
        if task.name == name:
            return task
    raise KeyError(name)


def _recall_pair(rng, table):
    n_e, n_r = table.shape
    while True:
        e, r, e2 = int(rng.integers(n_e)), int(rng.integers(n_r)), int(rng.integers(n_e))
        if table[e, r] != table[e2, r]:
            break
    prompt = [f"e{e}", f"r{r}", "="]
    return prompt, 0, f"e{table[e, r]}", f"e{e2}", f"e{table[e2, r]}"


def _chain_pair(rng, task, split, seed):
    chains = task.chains(rng, split, seed)
    used = {s for c in chains for s in c}
    fresh = [s for s in range(task.n_symbols) if s not in used]
    if not fresh:
        raise ValueError(f"{task} uses every symbol; a corrupted twin needs a spare one")
    new_end = int(rng.choice(fresh))
    words = [[f"s{i}" for i in c] for c in chains]
    edges = [[a, ">", b, ";"] for c in words for a, b in zip(c, c[1:])]
    order = [int(i) for i in rng.permutation(len(edges))]
    prompt = [w for i in order for w in edges[i]] + ["?", words[0][0], "="]
    if task.scratchpad:  # the intermediate steps are given; the last one is asked for
        prompt += words[0][1:-1]
    last_edge = order.index(len(words[0]) - 2)  # the queried chain's last premise
    changed = 4 * last_edge + 2
    return prompt, changed, words[0][-1], f"s{new_end}", f"s{new_end}"


def make_twins(mixture: TaskMixture, task: str, split: str, n: int, seed: int) -> Twins:
    """``n`` clean/corrupted prompt pairs of ``task`` ("recall" or "reasoning") from
    ``split``, deterministic given the mixture, ``split``, ``n`` and ``seed``."""
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be in {TASKS} and split in {SPLITS}; got {task}, {split}")
    tokenizer, table = mixture.tokenizer(), mixture.knowledge.table(mixture.seed)
    spec = _task(mixture, MIXTURE_NAMES[task])
    rng = np.random.default_rng([seed, 17, TASKS.index(task), SPLITS.index(split)])
    head = [BOS, task_token(spec)]
    rows = {k: [] for k in ("clean", "corrupt", "clean_answer", "corrupt_answer", "changed")}
    words = None
    for _ in range(n):
        if task == "recall":
            prompt, changed, answer, new_word, new_answer = _recall_pair(rng, table)
        else:
            prompt, changed, answer, new_word, new_answer = _chain_pair(rng, spec, split,
                                                                        mixture.seed)
        corrupt = list(prompt)
        corrupt[changed] = new_word
        words = words or head + prompt
        rows["clean"].append(tokenizer.encode(head + prompt))
        rows["corrupt"].append(tokenizer.encode(head + corrupt))
        rows["clean_answer"].append(tokenizer.encode([answer])[0])
        rows["corrupt_answer"].append(tokenizer.encode([new_answer])[0])
        rows["changed"].append(changed + len(head))
    arrays = {k: np.asarray(v, np.int32) for k, v in rows.items()}
    return Twins(task=task, words=words, **arrays)


# --------------------------------------------------------------------------- circuits

def select_circuit(effects, coverage: float, max_k: int) -> np.ndarray:
    """Indices (into ``effects.ravel()``) of a circuit: components by decreasing effect,
    the smallest k whose positive effects reach ``coverage`` of the total positive
    effect, capped at ``max_k``; at least one component (the top one) always."""
    effects = np.asarray(effects, np.float64).ravel()
    order = np.argsort(-effects, kind="stable")
    positive = np.clip(effects[order], 0.0, None)
    total = positive.sum()
    if total <= 0:
        k = 1
    else:
        k = int(np.searchsorted(np.cumsum(positive), coverage * total - 1e-12) + 1)
    return order[: max(1, min(k, max_k, effects.size))]


def level_components(level: str, n_layers: int, n_heads: int, d_mlp: int) -> list:
    """Every component of a level, in the order of :func:`level_effects`."""
    if level == "head/layer":
        return ([component("attn.z", layer=l, head=h) for l in range(n_layers)
                 for h in range(n_heads)]
                + [component("mlp_out", layer=l) for l in range(n_layers)])
    return [component("mlp.hidden", layer=l, d_mlp=i) for l in range(n_layers)
            for i in range(d_mlp)]


def level_effects(level: str, grids: dict) -> np.ndarray:
    if level == "head/layer":
        return np.concatenate([grids["heads"].ravel(), grids["mlp_layers"].ravel()])
    return grids["neurons"].ravel()


# --------------------------------------------------------------------------- stages

def train_family(config, family: str, builder, vocab_size: int, workdir: Path):
    """Train (or reuse) one family's decoder; ``(model, params, info)``."""
    t = default_train_config()
    t.seed = config.seed
    t.model = {**config.model.to_dict(), **FAMILIES[family], "vocab_size": vocab_size}
    t.data.batch_size = config.train.batch_size
    t.data.eval_batch_size = config.train.batch_size
    t.optimizer.learning_rate = config.train.learning_rate
    t.schedule.warmup_steps = config.train.warmup_steps
    t.train.steps = config.train.steps
    t.train.log_every = max(1, min(100, config.train.steps))
    t.train.eval_every = 0
    t.train.checkpoint_every = config.train.steps
    t.train.keep_checkpoints = 1
    t.train.async_checkpoints = False
    t.train.progress = config.progress
    folder = workdir / "models" / family
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"seed": config.seed, "data": config.data.to_dict(),
                       "model": t.model.to_dict(), "train": config.train.to_dict()},
                      sort_keys=True)
    spec_file = folder / "spec.json"
    if spec_file.exists() and spec_file.read_text() != spec:
        raise ValueError(
            f"{folder} holds a model trained with other settings (see {spec_file}); use "
            "another workdir (or delete that folder) to train with these ones")
    previous = Checkpointer(folder / "checkpoints").latest_step() \
        if (folder / "checkpoints").exists() else None
    model = Decoder(decoder_config(t.model, vocab_size))
    start = time.perf_counter()
    result = fit(t, folder, model, builder.as_data_source("train"))
    spec_file.write_text(spec)
    info = {"reused_checkpoint": previous == config.train.steps, "step": result.step,
            "seconds": time.perf_counter() - start, "config": dict(t.model)}
    return model, result.state.params, info


@functools.cache
def _jitted_apply(model):
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def logits_of(model, params, tokens):
    """The model's logits, jitted (eager ``apply`` of a scanned decoder is slow)."""
    return _jitted_apply(model)(params, jnp.asarray(tokens))


def task_accuracy(model, params, tokens, answers) -> float:
    logits = logits_of(model, params, tokens)
    return float(np.mean(np.asarray(logits[:, -1].argmax(-1)) == answers))


PATCH_GRIDS = {  # grid -> (site, axes of one cell); the TransformerLens-named equivalent
    "resid_pre": ("resid_pre", ("layer", "pos")),  # get_act_patch_resid_pre
    "attn_out": ("attn_out", ("layer", "pos")),  # get_act_patch_attn_out
    "mlp_out": ("mlp_out", ("layer", "pos")),  # get_act_patch_mlp_out
    "heads": ("attn.z", ("layer", "head")),  # get_act_patch_attn_head_out_all_pos
    "mlp_layers": ("mlp_out", ("layer",)),  # sweep(..., "mlp_out", ("layer",), ...)
    "neurons": ("mlp.hidden", ("layer", "d_mlp")),  # get_act_patch_mlp_neuron
}


def patch_cells(sites: dict) -> dict:
    """``{grid: (shape, [one-component set per cell])}`` for :data:`PATCH_GRIDS`."""
    cells = {}
    for grid, (name, axes) in PATCH_GRIDS.items():
        info = sites[name]
        shape = tuple(info.shape[info.axes.index(axis)] for axis in axes)
        cells[grid] = (shape, [[component(name, **dict(zip(axes, map(int, index))))]
                               for index in np.ndindex(*shape)])
    return cells


def patch_task(model, params, twins: Twins, progress: bool = False) -> dict:
    """Every PE grid of one task (see the module docstring) and the clean/corrupt
    metric values.

    Patching a cell = replacing the corrupted run's activation there by the clean one,
    i.e. "resample" ablation with the clean cache as the values; all cells of all grids
    run as one vmapped computation (:func:`~mechinterp.ablation.sweep_component_sets`),
    one compilation per task instead of one per grid. ``tests/test_recall_reasoning.py``
    checks it against :func:`mechinterp.patching.get_act_patch_resid_pre`.
    """
    clean, corrupt = jnp.asarray(twins.clean), jnp.asarray(twins.corrupt)
    metric = logit_diff(twins.clean_answer, twins.corrupt_answer, pos=-1)
    site_names = sorted({name for name, _ in PATCH_GRIDS.values()})
    clean_logits, cache = capture(model, params, clean, sites=site_names)
    corrupt_logits = logits_of(model, params, corrupt)
    m_clean, m_corrupt = float(metric(clean_logits)), float(metric(corrupt_logits))
    cells = patch_cells(list_sites(model, corrupt))
    sets = [s for _, grid_sets in cells.values() for s in grid_sets]
    values = np.asarray(sweep_component_sets(model, params, corrupt, sets, metric,
                                             method="resample", values=cache,
                                             progress=progress).values)
    grids, start = {}, 0
    for grid, (shape, grid_sets) in cells.items():
        raw = values[start:start + len(grid_sets)].reshape(shape)
        grids[grid] = np.asarray(normalized_effect(raw, m_clean, m_corrupt))
        start += len(grid_sets)
    return {"grids": grids, "m_clean": m_clean, "m_corrupt": m_corrupt}


def ablation_study(model, params, twins: dict, circuits: dict, config) -> dict:
    """Accuracy on both tasks with each circuit and its random controls ablated.

    ``circuits[level][task]`` is a list of components. Returns, per method and evaluated
    task, per-set per-item accuracies, plus the set layout."""
    a = config.analysis
    cfg = model.config
    sets, layout = [[]], [("none", "none", "baseline", -1)]  # set 0: nothing ablated
    for level in LEVELS:
        pool = level_components(level, cfg.n_layers, cfg.n_heads, cfg.d_mlp)
        for task in TASKS:
            circuit = circuits[level][task]
            layout.append((level, task, "circuit", -1))
            sets.append(circuit)
            for s in range(a.n_random):
                rng = np.random.default_rng([config.seed, 23, LEVELS.index(level),
                                             TASKS.index(task), s])
                pick = rng.choice(len(pool), size=len(circuit), replace=False)
                layout.append((level, task, "random", s))
                sets.append([pool[i] for i in sorted(pick)])
    sites = ["attn.z", "mlp_out", "mlp.hidden"]
    out = {}
    for method in a.methods.split(","):
        for task in TASKS:
            tw = twins[task]
            tokens = jnp.asarray(tw.clean)
            values = (mean_activations(model, params, [tokens], sites)
                      if method == "mean" else None)
            metric = accuracy(tw.clean_answer, pos=-1, reduce="none")
            result = sweep_component_sets(model, params, tokens, sets, metric, method=method,
                                          values=values, progress=False)
            out[(method, task)] = np.asarray(result.values)  # (n_sets, n_items)
    return {"layout": layout, "accuracy": out, "sizes": [len(s) for s in sets]}


def dissociation(study: dict, config) -> list[dict]:
    """Rows of the 2x2 dissociation: per method, level and circuit, the own- and
    other-task drops (unablated minus ablated accuracy; ± is the paired standard error
    over items), selectivity, and the random controls' mean and spread (sd over seeds)."""
    rows = []
    layout = study["layout"]
    for method in config.analysis.methods.split(","):
        for level in LEVELS:
            for circuit_task in TASKS:
                other = TASKS[1 - TASKS.index(circuit_task)]
                idx = next(i for i, (lv, t, kind, _) in enumerate(layout)
                           if lv == level and t == circuit_task and kind == "circuit")
                rnd = [i for i, (lv, t, kind, _) in enumerate(layout)
                       if lv == level and t == circuit_task and kind == "random"]
                drops = {}
                for task in TASKS:
                    acc = study["accuracy"][(method, task)]
                    per_item = acc[0] - acc[idx]  # paired: unablated - ablated, per item
                    drops[task] = (per_item.mean(),
                                   per_item.std(ddof=1) / np.sqrt(len(per_item))
                                   if len(per_item) > 1 else 0.0,
                                   acc[0].mean() - acc[rnd].mean(1))
                own, oth = drops[circuit_task], drops[other]
                rand_sel = own[2] - oth[2]
                rows.append({
                    "method": method, "level": level, "circuit": circuit_task,
                    "k": study["sizes"][idx],
                    "own_drop": float(own[0]), "own_se": float(own[1]),
                    "other_drop": float(oth[0]), "other_se": float(oth[1]),
                    "selectivity": float(own[0] - oth[0]),
                    "random_own_drop": float(own[2].mean()),
                    "random_own_sd": float(own[2].std(ddof=1)) if len(rnd) > 1 else 0.0,
                    "random_other_drop": float(oth[2].mean()),
                    "random_other_sd": float(oth[2].std(ddof=1)) if len(rnd) > 1 else 0.0,
                    "random_selectivity": float(rand_sel.mean()),
                    "random_selectivity_sd": (float(rand_sel.std(ddof=1))
                                              if len(rnd) > 1 else 0.0),
                })
    return rows


# --------------------------------------------------------------------------- outputs

def plot_patching(path: Path, family: str, task: str, grids: dict, words: list[str]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("resid_pre", "resid_pre (layer x pos)"), ("attn_out", "attn_out (layer x pos)"),
              ("mlp_out", "mlp_out (layer x pos)"), ("heads", "heads (layer x head)"),
              ("neurons", "MLP neurons (layer x neuron)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        grid = np.atleast_2d(grids[key])
        lim = max(1e-6, float(np.nanmax(np.abs(grid))))
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto",
                       interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("layer")
        ax.set_yticks(range(grid.shape[0]))
        if key == "heads":
            ax.set_xticks(range(grid.shape[1]))
            ax.set_xlabel("head")
        elif key == "neurons":
            ax.set_xlabel("neuron")
        if key in ("resid_pre", "attn_out", "mlp_out"):
            ax.set_xticks(range(len(words)))
            ax.set_xticklabels(words, rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{family}, {task}: normalized patching effect PE (clean -> corrupt)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_dissociation(path: Path, tables: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(tables)
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 3.5), squeeze=False)
    for ax, family in zip(axes[0], families):
        rows = tables[family]
        labels = [f"{r['method']}\n{r['level']}\n{r['circuit']}" for r in rows]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["own_drop"] for r in rows], 0.4, label="own-task drop")
        ax.bar(x + 0.2, [r["other_drop"] for r in rows], 0.4, label="other-task drop")
        ax.errorbar(x - 0.2, [r["random_own_drop"] for r in rows],
                    yerr=[r["random_own_sd"] for r in rows], fmt="k_", label="random (own)")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_title(f"{family}: accuracy drop when a circuit is ablated")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(x, se=None):
    return f"{x:+.3f}" if se is None else f"{x:+.3f} ± {se:.3f}"


def dissociation_markdown(rows: list[dict]) -> list[str]:
    lines = ["| method | level | circuit (k) | own-task drop | other-task drop | "
             "selectivity | random k: own drop | random k: other drop | "
             "random selectivity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['level']} | {r['circuit']} ({r['k']}) | "
            f"{_fmt(r['own_drop'], r['own_se'])} | {_fmt(r['other_drop'], r['other_se'])} | "
            f"{_fmt(r['selectivity'])} | {_fmt(r['random_own_drop'], r['random_own_sd'])} | "
            f"{_fmt(r['random_other_drop'], r['random_other_sd'])} | "
            f"{_fmt(r['random_selectivity'], r['random_selectivity_sd'])} |")
    return lines


def verdicts(tables: dict, accuracies: dict) -> list[str]:
    """What matched the paper's claims and what did not, from the numbers."""
    lines = []
    for family, rows in tables.items():
        for method in sorted({r["method"] for r in rows}):
            def get(level, task, rows=rows, method=method):
                return next(r for r in rows if r["method"] == method and r["level"] == level
                            and r["circuit"] == task)
            for level in LEVELS:
                rec, rea = get(level, "recall"), get(level, "reasoning")
                double = (rec["selectivity"] > 0 and rea["selectivity"] > 0)
                beats = (rec["own_drop"] > rec["random_own_drop"] + rec["random_own_sd"]
                         and rea["own_drop"] > rea["random_own_drop"] + rea["random_own_sd"])
                lines.append(
                    f"- {family}, {method} ablation, {level} level: "
                    f"{'double dissociation (both selectivities > 0)' if double else 'no double dissociation'}"
                    f"; recall circuit cuts recall by {rec['own_drop']:.1%} "
                    f"(reasoning {rec['other_drop']:+.1%}), reasoning circuit cuts reasoning "
                    f"by {rea['own_drop']:.1%} (recall {rea['other_drop']:+.1%}); "
                    f"{'both beat' if beats else 'not both beat'} random sets of equal size "
                    "(by more than one sd).")
            hl = [r for r in rows if r["method"] == method and r["level"] == "head/layer"]
            nr = [r for r in rows if r["method"] == method and r["level"] == "neuron"]
            weaker = np.mean([r["selectivity"] for r in nr]) < np.mean(
                [r["selectivity"] for r in hl])
            lines.append(f"- {family}, {method}: neuron-level selectivity is "
                         f"{'weaker' if weaker else 'not weaker'} than head/layer level "
                         f"(mean {np.mean([r['selectivity'] for r in nr]):+.3f} vs "
                         f"{np.mean([r['selectivity'] for r in hl]):+.3f}); paper: weaker.")
    return lines


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# --------------------------------------------------------------------------- the job

def run(config: ml_collections.ConfigDict, workdir) -> dict:
    """Train both families, patch, pick circuits, ablate, write the run folder."""
    config = resolve(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.resolved.json").write_text(json.dumps(config.to_dict(), indent=2))
    started = time.perf_counter()
    families = [f.strip() for f in config.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    a = config.analysis
    timings = {}

    stages = tqdm(total=2 + 3 * len(families), desc="recall_reasoning",
                  disable=not config.progress)
    stages.set_postfix_str("data")
    mixture = make_mixture(config)
    builder = build_synthetic(mixture, num_train=config.data.num_train,
                              num_test=config.data.num_test, data_dir=workdir / "data")
    vocab_size = mixture.tokenizer().vocab_size
    twins = {task: make_twins(mixture, task, "test", a.n_items, config.seed) for task in TASKS}
    train_twins = {task: make_twins(mixture, task, "train", a.n_items, config.seed)
                   for task in TASKS}
    timings["data"] = time.perf_counter() - started
    stages.update(1)

    results = {"families": {}, "config": config.to_dict()}
    arrays = {}
    tables = {}
    for family in families:
        stages.set_postfix_str(f"{family}: train")
        t0 = time.perf_counter()
        model, params, info = train_family(config, family, builder, vocab_size, workdir)
        timings[f"{family}/train"] = time.perf_counter() - t0
        stages.update(1)
        acc = {task: task_accuracy(model, params, twins[task].clean, twins[task].clean_answer)
               for task in TASKS}
        acc_train = {task: task_accuracy(model, params, train_twins[task].clean,
                                         train_twins[task].clean_answer) for task in TASKS}
        acc_corrupt = {task: task_accuracy(model, params, twins[task].corrupt,
                                           twins[task].corrupt_answer) for task in TASKS}

        stages.set_postfix_str(f"{family}: patch")
        t0 = time.perf_counter()
        patched = {task: patch_task(model, params, twins[task]) for task in TASKS}
        for task in TASKS:
            for grid, values in patched[task]["grids"].items():
                arrays[f"{family}/{task}/{grid}"] = values
            plot_patching(workdir / f"patching_{family}_{task}.png", family, task,
                          patched[task]["grids"], twins[task].words)
        timings[f"{family}/patch"] = time.perf_counter() - t0
        stages.update(1)

        stages.set_postfix_str(f"{family}: ablate")
        t0 = time.perf_counter()
        cfg = model.config
        circuits, circuit_info = {}, {}
        for level in LEVELS:
            pool = level_components(level, cfg.n_layers, cfg.n_heads, cfg.d_mlp)
            coverage = a.coverage if level == "head/layer" else a.neuron_coverage
            frac = a.max_frac if level == "head/layer" else a.neuron_max_frac
            max_k = max(1, int(np.floor(frac * len(pool))))
            circuits[level], circuit_info[level] = {}, {}
            for task in TASKS:
                effects = level_effects(level, patched[task]["grids"])
                chosen = select_circuit(effects, coverage, max_k)
                circuits[level][task] = [pool[i] for i in chosen]
                circuit_info[level][task] = [
                    {"component": str(pool[i]), "pe": float(effects[i])} for i in chosen]
        study = ablation_study(model, params, twins, circuits, config)
        rows = dissociation(study, config)
        tables[family] = rows
        timings[f"{family}/ablate"] = time.perf_counter() - t0
        stages.update(1)

        results["families"][family] = {
            "training": info, "accuracy_test": acc, "accuracy_train_items": acc_train,
            "accuracy_corrupted_twins": acc_corrupt,
            "logit_diff": {task: {"clean": patched[task]["m_clean"],
                                  "corrupt": patched[task]["m_corrupt"]} for task in TASKS},
            "circuits": circuit_info, "dissociation": rows,
        }
    stages.set_postfix_str("report")
    plot_dissociation(workdir / "dissociation.png", tables)
    timings["total"] = time.perf_counter() - started
    results["timings_s"] = timings
    np.savez(workdir / "results.npz", **arrays)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (workdir / "report.md").write_text(report_markdown(config, results, tables, twins))
    stages.update(1)
    stages.close()
    return results


def report_markdown(config, results, tables, twins) -> str:
    fams = results["families"]
    lines = [
        "# Recall vs reasoning circuits (METHODS.md item 1, small scale)", "",
        f"Preset `{config.preset}`, seed {config.seed}, families {', '.join(fams)}; "
        f"total {results['timings_s']['total']:.0f} s. Read `results.json` for every number, "
        "`results.npz` for the patching grids, `patching_<family>_<task>.png` for heatmaps.",
        "",
        "## Puzzles", "",
        f"- recall (memorized fact, not in the prompt): `{' '.join(twins['recall'].words)}`"
        f"; twin changes the entity (position {int(twins['recall'].changed[0])}).",
        f"- reasoning ({config.data.chain_length - 1} hops over in-context premises, "
        f"{config.data.distractors} distractor chain(s), {config.data.holdout:.0%} of "
        f"(start, end) combinations test-only): `{' '.join(twins['reasoning'].words)}`; "
        "twin changes the queried chain's last premise's object.",
        f"- {config.analysis.n_items} twin pairs per task from the test split; "
        "metric logit_diff(clean answer, corrupted answer) at the answer position.", "",
        "## Accuracies (top-1 at the answer position)", "",
        "| model | recall (test) | reasoning (test, held-out combos) | reasoning (train items) "
        "| trained / reused | steps | train s |", "|---|---|---|---|---|---|---|",
    ]
    for family, r in fams.items():
        info = r["training"]
        lines.append(
            f"| {family} | {r['accuracy_test']['recall']:.3f} | "
            f"{r['accuracy_test']['reasoning']:.3f} | "
            f"{r['accuracy_train_items']['reasoning']:.3f} | "
            f"{'reused checkpoint' if info['reused_checkpoint'] else 'trained'} | "
            f"{info['step']} | {info['seconds']:.0f} |")
    low = [(f, t) for f, r in fams.items() for t, v in r["accuracy_test"].items() if v < 0.9]
    if low:
        lines += ["", "Below 0.9: " + ", ".join(f"{f}/{t}" for f, t in low) + ". Circuits "
                  "of a task the model does not solve are weak evidence: patching then "
                  "measures partial (often heuristic) mechanisms."]
    lines += ["", "Logit difference clean / corrupted:", ""]
    for family, r in fams.items():
        lines.append("- " + family + ": " + "; ".join(
            f"{t} {v['clean']:.2f} / {v['corrupt']:.2f}" for t, v in r["logit_diff"].items()))
    lines += ["", "## Circuits (top components by PE)", "",
              f"Rule: components sorted by PE; the smallest k whose positive PE reaches "
              f"{config.analysis.coverage:.0%} (neurons {config.analysis.neuron_coverage:.0%}) "
              f"of the total positive PE, capped at {config.analysis.max_frac:.0%} "
              f"(neurons {config.analysis.neuron_max_frac:.0%}) of the level's components, "
              "at least 1. Head/layer level = attention heads (`attn.z`) and whole MLP "
              "layers (`mlp_out`).", ""]
    for family, r in fams.items():
        for level in LEVELS:
            for task in TASKS:
                comps = ", ".join(f"{c['component']} ({c['pe']:.2f})"
                                  for c in r["circuits"][level][task])
                lines.append(f"- {family}, {level}, {task}: {comps}")
    lines += ["", "## Dissociation (accuracy drops; ± is the paired s.e. over items for circuits, "
              f"sd over {config.analysis.n_random} random sets of equal size for controls)",
              ""]
    for family in tables:
        lines += [f"### {family}", ""] + dissociation_markdown(tables[family]) + [""]
    lines += ["## Against the paper's claims", "",
              "Paper: ablating recall circuits cuts fact retrieval by up to 15% with "
              "reasoning intact, and the converse; neuron-level effects are weaker.", ""]
    lines += verdicts(tables, {f: r["accuracy_test"] for f, r in fams.items()})
    lines += ["", "Caveats: tiny models trained for minutes on synthetic tasks; one training "
              "seed per family (spread is over items and random control sets, not over "
              "training runs); mean ablation uses the evaluated task's own per-position "
              "means."]
    timings = results["timings_s"]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
              ""]
    return "\n".join(lines)
