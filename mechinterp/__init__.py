"""mechinterp: named sites and data-only interventions for JAX/Flax models.

    lm = mechinterp.load("path/to/model.gguf")     # or an HF folder: strings in and out
    logits, cache = lm.run_with_cache("The capital of France is", sites=["resid_pre"])

    import mechinterp as mi
    model, params = mi.models.load_hf("path/to/hf_folder")
    logits, cache = mi.capture(model, params, tokens, sites=["resid_pre"])
    logits = mi.intervene(model, params, tokens,
                          interventions={"attn.z": mi.Intervention.zero(mask=head_mask)})

``models``, ``train``, ``load``/``LanguageModel`` and the heavier analyses are imported on
first use, so the analysis core never depends on them (README: "What is here").
"""

import importlib

from mechinterp import (ablation, attribution, components, experts, jaxpr_flops, metrics,
                        path_patching, patching, sweep)
from mechinterp.site_io import (SiteInfo, capture, intervene, intervention_variables, list_sites,
                            read_sites, site_table)
from mechinterp.interventions import Intervention
from mechinterp.sites import SiteSpec, site, site_is_used

__all__ = [
    "ablation",
    "attribution",
    "components",
    "experts",
    "jaxpr_flops",
    "metrics",
    "path_patching",
    "patching",
    "sweep",
    "Intervention",
    "SiteInfo",
    "SiteSpec",
    "capture",
    "intervene",
    "intervention_variables",
    "list_sites",
    "read_sites",
    "site",
    "site_is_used",
    "site_table",
]

# Imported on first use: the model families and training (so the core never depends on
# them), and the analyses with heavier dependencies (scikit-learn, matplotlib).
_LAZY = ("models", "train", "llm_drop", "depth_efficiency", "bricks", "transcoders",
         "logit_attribution", "display",
         "attribution_graph", "probe_prompting")


# The string layer sits above the model families: resolved on first use.
_LAZY_ATTRIBUTES = {"load": "language_model", "LanguageModel": "language_model"}


def __getattr__(name):
    if name in _LAZY_ATTRIBUTES:
        module = importlib.import_module(f"mechinterp.{_LAZY_ATTRIBUTES[name]}")
        return getattr(module, name)
    if name in _LAZY:
        return importlib.import_module(f"mechinterp.{name}")
    raise AttributeError(f"module 'mechinterp' has no attribute {name!r}")
