"""Task circuits from patching, for any decoder with the standard sites: every patching
grid of a clean/corrupted prompt set in one vmapped sweep, or estimated by attribution
patching where a grid is too large to patch cell by cell (:func:`patch_grids`), the
coverage rule that picks a circuit from its effects (:func:`select_circuit`,
:func:`choose_circuits`), ablation of each task's circuit against random sets of equal size
(:func:`ablation_study`) and the two-task double dissociation (:func:`dissociation`).

Levels: *head/layer* (every attention head ``attn.z`` and every whole MLP layer
``mlp_out``) and *neuron* (every ``mlp.hidden`` unit).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mechinterp.ablation import mean_activations, sweep_component_sets
from mechinterp.attribution import attribution_patch
from mechinterp.site_io import capture, list_sites
from mechinterp.components import component
from mechinterp.experiments.kit.lm import logits_of
from mechinterp.metrics import accuracy
from mechinterp.patching import normalized_effect

LEVELS = ("head/layer", "neuron")
PATCH_GRIDS = {  # grid -> (site, axes of one cell); the TransformerLens-named equivalent
    "resid_pre": ("resid_pre", ("layer", "pos")),  # get_act_patch_resid_pre
    "attn_out": ("attn_out", ("layer", "pos")),  # get_act_patch_attn_out
    "mlp_out": ("mlp_out", ("layer", "pos")),  # get_act_patch_mlp_out
    "heads": ("attn.z", ("layer", "head")),  # get_act_patch_attn_head_out_all_pos
    "mlp_layers": ("mlp_out", ("layer",)),  # sweep(..., "mlp_out", ("layer",), ...)
    "neurons": ("mlp.hidden", ("layer", "d_mlp")),  # get_act_patch_mlp_neuron
}
ABLATED_SITES = ("attn.z", "mlp_out", "mlp.hidden")


def patch_cells(sites: dict, grids=tuple(PATCH_GRIDS)) -> dict:
    """``{grid: (shape, [one-component set per cell])}`` for ``grids`` (names in
    :data:`PATCH_GRIDS`)."""
    cells = {}
    for grid in grids:
        name, axes = PATCH_GRIDS[grid]
        info = sites[name]
        shape = tuple(info.shape[info.axes.index(axis)] for axis in axes)
        cells[grid] = (shape, [[component(name, **dict(zip(axes, map(int, index))))]
                               for index in np.ndindex(*shape)])
    return cells


def patch_grids(model, params, clean, corrupt, metric, progress: bool = False, *,
                exact=tuple(PATCH_GRIDS), estimated=()) -> dict:
    """The :data:`PATCH_GRIDS` grids of normalized patching effects (denoising: clean
    activations into the corrupted run), PE = (m_patched - m_corrupt) / (m_clean -
    m_corrupt); returns ``{"grids", "m_clean", "m_corrupt", "estimated"}``.

    ``exact`` grids are patched cell by cell: a cell = "resample" ablation of the corrupted
    run with the clean cache as the values; all cells of all grids are one vmapped
    computation (:func:`~mechinterp.ablation.sweep_component_sets`), one compilation
    instead of one per grid. ``tests/test_recall_reasoning.py`` checks it against
    :func:`mechinterp.patching.get_act_patch_resid_pre`. ``estimated`` grids (too many
    cells to patch, e.g. a real model's 30 x 1536 neurons) take attribution patching's
    first-order m_patched - m_corrupt ~= (x_clean - x_corrupt) . dm/dx instead
    (:func:`~mechinterp.attribution.attribution_patch`; Nanda 2023, Syed et al. 2023).
    """
    exact, estimated = tuple(exact), tuple(estimated)
    unknown = sorted(set(exact + estimated) - set(PATCH_GRIDS))
    if unknown or set(exact) & set(estimated) or not exact + estimated:
        raise ValueError(f"grids to patch must be distinct names of {sorted(PATCH_GRIDS)}, "
                         f"each exact or estimated; got exact={exact}, estimated={estimated}")
    clean, corrupt = jnp.asarray(clean), jnp.asarray(corrupt)
    site_names = sorted({PATCH_GRIDS[grid][0] for grid in exact + estimated})
    clean_logits, cache = capture(model, params, clean, sites=site_names)
    m_clean = float(metric(clean_logits))
    m_corrupt = float(metric(logits_of(model, params, corrupt)))
    grids = {}
    if exact:
        cells = patch_cells(list_sites(model, corrupt), exact)
        sets = [s for _, grid_sets in cells.values() for s in grid_sets]
        values = np.asarray(sweep_component_sets(model, params, corrupt, sets, metric,
                                                 method="resample", values=cache,
                                                 progress=progress).values)
        start = 0
        for grid, (shape, grid_sets) in cells.items():
            raw = values[start:start + len(grid_sets)].reshape(shape)
            grids[grid] = np.asarray(normalized_effect(raw, m_clean, m_corrupt))
            start += len(grid_sets)
    calls = []  # estimated grids on distinct sites share one forward and backward
    for grid in estimated:
        free = next((c for c in calls if PATCH_GRIDS[grid][0] not in
                     {PATCH_GRIDS[g][0] for g in c}), None)
        if free is None:
            calls.append([grid])
        else:
            free.append(grid)
    for call in calls:
        changes = attribution_patch(model, params, corrupt, cache, metric,
                                    dict(PATCH_GRIDS[g] for g in call))
        for grid in call:
            change = np.asarray(changes[PATCH_GRIDS[grid][0]].values)
            grids[grid] = np.asarray(normalized_effect(change + m_corrupt, m_clean, m_corrupt))
    return {"grids": {g: grids[g] for g in PATCH_GRIDS if g in grids}, "m_clean": m_clean,
            "m_corrupt": m_corrupt, "estimated": list(estimated)}


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


def random_sets(pool: list, size: int, n: int, key: tuple[int, ...]) -> list[list]:
    """``n`` random sets of ``size`` components of ``pool`` (set ``s`` drawn with
    ``numpy.random.default_rng([*key, s])``, components in pool order)."""
    sets = []
    for s in range(n):
        pick = np.random.default_rng([*key, s]).choice(len(pool), size=size, replace=False)
        sets.append([pool[i] for i in sorted(pick)])
    return sets


def ablated_accuracy(model, params, tokens, answers, sets: list[list], method: str,
                     sites=ABLATED_SITES) -> np.ndarray:
    """Top-1 accuracy at the last position per set and item, ``(n_sets, n_items)``, with
    each set ablated (``method`` "zero", or "mean" over ``tokens`` per position)."""
    tokens = jnp.asarray(tokens)
    values = mean_activations(model, params, [tokens], list(sites)) if method == "mean" \
        else None
    metric = accuracy(answers, pos=-1, reduce="none")
    return np.asarray(sweep_component_sets(model, params, tokens, sets, metric, method=method,
                                           values=values, progress=False).values)


def choose_circuits(cfg, grids: dict, a) -> tuple[dict, dict]:
    """``circuits[level][task]`` (components) and their PEs, by the coverage rule, from
    ``grids[task]`` (:func:`patch_grids`); ``cfg`` has ``n_layers``, ``n_heads``,
    ``d_mlp``; ``a`` has ``coverage`` / ``max_frac`` and ``neuron_coverage`` /
    ``neuron_max_frac`` (the cap as a share of the level's components)."""
    circuits, info = {}, {}
    for level in LEVELS:
        pool = level_components(level, cfg.n_layers, cfg.n_heads, cfg.d_mlp)
        neuron = level == "neuron"
        max_k = max(1, int(np.floor((a.neuron_max_frac if neuron else a.max_frac) * len(pool))))
        circuits[level], info[level] = {}, {}
        for task, task_grids in grids.items():
            effects = level_effects(level, task_grids)
            chosen = select_circuit(effects, a.neuron_coverage if neuron else a.coverage, max_k)
            circuits[level][task] = [pool[i] for i in chosen]
            info[level][task] = [{"component": str(pool[i]), "pe": float(effects[i])}
                                 for i in chosen]
    return circuits, info


def ablation_study(model, params, prompts: dict, circuits: dict, *, n_random: int,
                   methods: list[str], seed: int) -> dict:
    """Per method and evaluated task, accuracy ``(n_sets, n_items)`` with nothing (set 0),
    each circuit and its ``n_random`` random controls (same level and size; set ``s`` of
    level ``li``, task ``ti`` drawn with key ``(seed, 23, li, ti, s)``) ablated.
    ``prompts[task] = (tokens, answers)``; returns ``{"layout", "accuracy", "sizes"}``."""
    cfg = model.config
    sets, layout = [[]], [("none", "none", "baseline", -1)]
    for li, level in enumerate(LEVELS):
        pool = level_components(level, cfg.n_layers, cfg.n_heads, cfg.d_mlp)
        for ti, task in enumerate(prompts):
            circuit = circuits[level][task]
            controls = random_sets(pool, len(circuit), n_random, key=(seed, 23, li, ti))
            layout += [(level, task, "circuit", -1)] + [(level, task, "random", s)
                                                        for s in range(len(controls))]
            sets += [circuit] + controls
    out = {(method, task): ablated_accuracy(model, params, tokens, answers, sets, method)
           for method in methods for task, (tokens, answers) in prompts.items()}
    return {"layout": layout, "accuracy": out, "sizes": [len(s) for s in sets]}


def _sd(x) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def dissociation(study: dict, methods: list[str], tasks: tuple[str, str], *, n_boot: int = 0,
                 seed: int = 0) -> list[dict]:
    """The 2x2 double dissociation: per method, level and circuit, the own- and other-task
    accuracy drops (unablated - ablated; ± paired s.e. over items), selectivity (own -
    other) and the random controls' mean and sd over sets. With ``n_boot`` > 0 also 95 %
    percentile bootstrap intervals over items (``own_ci``, ``other_ci``, ``selectivity_ci``;
    each task's items resampled with replacement, the same resamples for every row, drawn
    with ``numpy.random.default_rng([seed, 29, task index])``)."""
    if len(tasks) != 2:
        raise ValueError(f"a double dissociation compares two tasks, got {tasks}")
    rows, layout = [], study["layout"]
    resamples = {task: np.random.default_rng([seed, 29, i]).integers(
        study["accuracy"][(methods[0], task)].shape[1], size=(n_boot, study["accuracy"][
            (methods[0], task)].shape[1])) for i, task in enumerate(tasks)} if n_boot else {}
    for method in methods:
        for level in LEVELS:
            for circuit_task in tasks:
                where = [i for i, (lv, t, _, _) in enumerate(layout)
                         if lv == level and t == circuit_task]
                idx, rnd = where[0], where[1:]  # the circuit, then its random controls
                drops, boot = {}, {}
                for task in tasks:
                    acc = study["accuracy"][(method, task)]
                    per_item = acc[0] - acc[idx]  # paired: unablated - ablated, per item
                    drops[task] = (per_item.mean(), _sd(per_item) / np.sqrt(len(per_item)),
                                   acc[0].mean() - acc[rnd].mean(1))
                    if n_boot:
                        boot[task] = per_item[resamples[task]].mean(1)
                own, oth = drops[circuit_task], drops[tasks[1 - tasks.index(circuit_task)]]
                rows.append({
                    "method": method, "level": level, "circuit": circuit_task,
                    "k": study["sizes"][idx], "own_drop": float(own[0]),
                    "own_se": float(own[1]), "other_drop": float(oth[0]),
                    "other_se": float(oth[1]), "selectivity": float(own[0] - oth[0]),
                    "random_own_drop": float(own[2].mean()), "random_own_sd": _sd(own[2]),
                    "random_other_drop": float(oth[2].mean()), "random_other_sd": _sd(oth[2]),
                    "random_selectivity": float((own[2] - oth[2]).mean()),
                    "random_selectivity_sd": _sd(own[2] - oth[2])})
                if n_boot:
                    other_task = tasks[1 - tasks.index(circuit_task)]
                    own_b, oth_b = boot[circuit_task], boot[other_task]
                    rows[-1].update(own_ci=_ci(own_b), other_ci=_ci(oth_b),
                                    selectivity_ci=_ci(own_b - oth_b))
    return rows


def _ci(samples) -> list[float]:
    return [float(q) for q in np.percentile(samples, [2.5, 97.5])]


GRID_PANELS = [("resid_pre", "resid_pre (layer x pos)"), ("attn_out", "attn_out (layer x pos)"),
               ("mlp_out", "mlp_out (layer x pos)"), ("heads", "heads (layer x head)"),
               ("neurons", "MLP neurons (layer x neuron)")]


def plot_grids(run, name: str, title: str, grids: dict, words: list[str],
               estimated=()) -> None:
    """One row of PE heatmaps (the :data:`GRID_PANELS` in ``grids``) saved as
    ``WORKDIR/name``; ``estimated`` grids are titled as attribution estimates."""
    panels = [(key, panel) for key, panel in GRID_PANELS if key in grids]
    if not panels:
        return
    with run.figure(name, 1, len(panels), figsize=(4.2 * len(panels), 3.2),
                    squeeze=False) as (fig, axes):
        for ax, (key, panel) in zip(axes[0], panels):
            grid = np.atleast_2d(grids[key])
            lim = max(1e-6, float(np.nanmax(np.abs(grid))))
            im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto",
                           interpolation="nearest")
            ax.set(title=panel + (" [attribution est.]" if key in estimated else ""),
                   ylabel="layer", yticks=range(grid.shape[0]))
            if key in ("heads", "neurons"):
                ax.set_xlabel("head" if key == "heads" else "neuron")
            else:
                ax.set_xticks(range(len(words)), words, rotation=90, fontsize=6)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(title)
