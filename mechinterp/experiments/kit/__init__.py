"""The experiment kit: what every reproduction shares (docs/adding_a_reproduction.md).

- presets: ``with_preset(config, PRESETS, arg)`` inside ``configs/NAME.py``'s
  ``get_config(arg=None)``; ``common(config, job=..., workdir=...)`` adds the shared keys.
- run folder: ``Run`` (config.json, run.json status, results.json/npz, figures, timings,
  report.md), ``job`` (marks a job that writes its own config.json), ``Interrupted``.
- training: ``train_or_reuse`` (any linen module, fingerprint-guarded), ``train_config``.
- seeds: ``train_seeds``, ``aggregate``, ``pm`` ("0.83 ± 0.04 (3 seeds)").
- report: ``Claim``, ``claims_table``, ``table``, ``lower_claim`` (a below b over seeds).
- one JSON encoder (``jsonio``), one plotting set-up (``plots.figure``).
- ``lm``: small decoders on synthetic task mixtures (families, data, metrics).
- ``classifier``: ``Classifier``, one compiled step for many small image classifiers.
"""

from mechinterp.experiments.kit import classifier, jsonio, lm, plots
from mechinterp.experiments.kit.jsonio import Encoder, write_json
from mechinterp.experiments.kit.plots import figure
from mechinterp.experiments.kit.presets import UnknownPreset, common, with_preset
from mechinterp.experiments.kit.report import Claim, claims_table, table, timings_line
from mechinterp.experiments.kit.report import lower_claim
from mechinterp.experiments.kit.run import (EXIT_INTERRUPTED, Interrupted, Run,
                                            RunFolderMismatch, job)
from mechinterp.experiments.kit.seeds import aggregate, is_stat, mean_of, pm, train_seeds
from mechinterp.experiments.kit.train import (Trained, train_config, train_or_reuse,
                                              training_note)
from mechinterp.train.fingerprint import FingerprintMismatch

__all__ = [
    "aggregate", "Claim", "claims_table", "classifier", "common", "Encoder",
    "EXIT_INTERRUPTED", "figure",
    "FingerprintMismatch", "Interrupted", "is_stat", "job", "jsonio", "lm", "mean_of",
    "plots", "pm", "Run", "RunFolderMismatch", "table", "timings_line", "Trained",
    "train_config", "train_or_reuse", "train_seeds", "training_note", "UnknownPreset",
    "with_preset", "write_json",
    "lower_claim",
]
