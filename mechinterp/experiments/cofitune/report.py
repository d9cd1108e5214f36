"""CoFiTune's report: speciality vs versatility, the coarse grid, where knowledge landed."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.kit.domain import clear_gain

NAMES = {"base": "base (pretrained)", "full": "full fine-tuning",
         "coarse": "coarse only (best layer range x module)",
         "cofitune": "CoFiTune (coarse + soft-masked gradients)"}


def _one(seed: dict) -> dict:
    out = {m: {"speciality": seed[m]["domain"]["exact"],
               "versatility": seed[m]["general"]["exact"],
               "domain_loss": seed[m]["domain"]["loss"],
               "general_loss": seed[m]["general"]["loss"]} for m in NAMES}
    for m in ("full", "coarse", "cofitune"):
        out[m]["seconds"] = seed[m]["seconds"]
    out["versatility_diff"] = out["cofitune"]["versatility"] - out["full"]["versatility"]
    out["speciality_diff"] = out["cofitune"]["speciality"] - out["full"]["speciality"]
    return out


def lines(config, results: dict, timings: dict) -> list[str]:
    per = [_one(s) for s in results["per_seed"]]
    sm, pm, s = kit.aggregate(per), kit.pm, kit.mean_of
    results["summary"] = sm
    rows = [(NAMES[m], pm(sm[m]["speciality"], ".3f"), pm(sm[m]["versatility"], ".3f"),
             pm(sm[m]["domain_loss"], ".3f"), pm(sm[m]["general_loss"], ".3f"))
            for m in NAMES]
    claims = [
        kit.Claim("CoFiTune keeps more versatility than full SFT (about +14% at 13B)",
                  f"general exact match CoFiTune - full: {pm(sm['versatility_diff'], '+.3f')} "
                  f"({s(sm['cofitune']['versatility']):.3f} vs {s(sm['full']['versatility']):.3f})",
                  clear_gain(sm["versatility_diff"]), "mean - sd > 0"),
        kit.Claim("... without giving up speciality",
                  f"domain exact match CoFiTune - full: {pm(sm['speciality_diff'], '+.3f')}",
                  s(sm["speciality_diff"]) > -0.02, "within -0.02 of full"),
    ]
    first = results["per_seed"][0]
    grid = [(f"{g['layers'][0]}-{g['layers'][1] - 1}", g["module"], f"{g['val_domain']:.3f}",
             f"{g['val_general']:.3f}") for g in first["grid"]]
    best = [f"{s_['best']['module']} of layers {s_['best']['layers'][0]}-"
            f"{s_['best']['layers'][1] - 1}" for s_ in results["per_seed"]]
    return [
        "# CoFiTune at small scale", "",
        f"Seeds {results['seeds']}; decoder {config.model.to_dict()}; general tasks "
        f"{list(config.data.general)}, domain task {list(config.data.domain)}; "
        f"{config.tune.steps} tuning steps per run.", "",
        "## Paper claim | ours", "", *kit.claims_table(claims), "",
        "## Speciality vs versatility (test set; mean ± sd over seeds)", "",
        *kit.table(["method", "speciality (domain exact)", "versatility (general exact)",
                    "domain loss", "general loss"], rows), "",
        f"Chosen by the coarse search, per seed: {best}.", "",
        f"## Coarse grid, seed {results['seeds'][0]} (validation rows)", "",
        *kit.table(["layers", "module", "domain exact", "general exact"], grid), "",
        "## Where the domain knowledge landed", "",
        "Domain Δloss when one layer of the tuned model gets the base weights back "
        f"(seed {results['seeds'][0]}):",
        *[f"- {NAMES[m]}: {np.round(first[m]['revert_domain'], 3).tolist()}"
          for m in ("full", "coarse", "cofitune")],
        f"- Fine importance, mean per layer (heads, neurons): "
        f"{np.round(first['importance_mean']['heads'], 2).tolist()}, "
        f"{np.round(first['importance_mean']['neurons'], 2).tolist()}", "",
        "## What is simplified", "",
        "- Synthetic general (recall, chain) vs domain (arithmetic) tasks; exact match as "
        "speciality / versatility; tiny decoders, not 7-13B chat models.",
        "- The decoder has no dropout; the two 'dropout passes' drop heads and FFN neurons "
        f"(rate {config.tune.dropout}) through multiplicative masks. FFN-output units "
        "(columns of the down projection) are not soft-masked.",
        "- The coarse pick maximizes validation speciality + versatility (held-out train rows).",
        "", f"Timings: {kit.timings_line(timings)}.",
    ]
