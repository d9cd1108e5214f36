"""Probe prompting: name and group a circuit's transcoder features by how they respond to
prompts that keep a seed prompt's syntax but swap its concepts ("Automated Circuit
Interpretation via Probe Prompting"; METHODS.md item 2).

Each feature of a (pruned) attribution graph gets an activation signature over the probe
prompts (peak consistency, distinct peaks, function-word share, sparsity, layer); ordered,
transparent rules (:class:`Rules`, :func:`classify`) turn it into a category (Semantic,
Say "X", Relationship, Review) and a name; supernodes are the features sharing both. A
geometric baseline clusters the same features by decoder direction. The signature, the
rules and the scores in full: ``docs/probe_prompting.md``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from mechinterp.site_io import intervene
from mechinterp.family import HasLayers, require
from mechinterp.interventions import Intervention
from mechinterp.transcoders import Transcoder, apply_layers, mlp_activations

CATEGORIES = ("Semantic", "Say X", "Relationship", "Review")


def probe_activations(model, params, transcoder: Transcoder, tc_params,
                      probes: np.ndarray) -> np.ndarray:
    """Feature activations on each probe prompt: (probe, layer, pos, feature).
    ``probes`` (n_probes, T) token ids, all of one length (the seed prompt's syntax)."""
    probes = np.asarray(probes)
    if probes.ndim != 2:
        raise ValueError(f"probes must be (n_probes, length) token ids, got {probes.shape}")
    acts = mlp_activations(model, params, jnp.asarray(probes))
    _, features = apply_layers(transcoder, tc_params, acts["mlp_in"])
    return np.moveaxis(np.asarray(features), 1, 0)


@dataclasses.dataclass(frozen=True)
class Signature:
    layer: int
    feature: int
    peak_consistency: float
    distinct_peaks: int
    function_share: float
    sparsity: float
    modal_peak: str
    fires_on: int  # number of probes where the feature is active somewhere


def signatures(activations: np.ndarray, words: Sequence[Sequence[str]],
               features: Iterable[tuple[int, int]], function_words: set[str]
               ) -> list[Signature]:
    """The activation signature of each ``(layer, feature)`` over the probes.
    ``activations``: (probe, layer, pos, feature); ``words[i][t]`` the token at position
    ``t`` of probe ``i``."""
    features = list(features)
    out = []
    for (layer, feature), peaks in zip(features, peak_tokens(activations, words, features),
                                       strict=True):
        profile = activations[:, layer, :, feature]  # (probe, pos)
        counts = collections.Counter(peaks)
        modal, top = counts.most_common(1)[0] if peaks else ("", 0)
        out.append(Signature(
            layer=int(layer), feature=int(feature),
            peak_consistency=top / len(peaks) if peaks else 0.0,
            distinct_peaks=len(counts),
            function_share=(sum(p in function_words for p in peaks) / len(peaks)
                            if peaks else 0.0),
            sparsity=float(np.mean(profile <= 0)),
            modal_peak=modal, fires_on=len(peaks)))
    return out


@dataclasses.dataclass(frozen=True)
class Rules:
    """Thresholds of the ordered rules (module docstring)."""

    consistency: float = 0.8
    say_function_share: float = 0.5
    say_consistency: float = 0.6
    late_depth: float = 0.5
    dense_sparsity: float = 0.5
    early_depth: float = 0.5


def classify(signature: Signature, n_layers: int, function_words: set[str],
             say_name: str | None = None, rules: Rules = Rules()) -> tuple[str, str, int]:
    """``(category, name, number of the rule that fired)`` for one signature."""
    s = signature
    depth = s.layer / max(n_layers - 1, 1)
    if s.fires_on == 0:
        return "Review", "", 5
    if (s.distinct_peaks == 1 and s.peak_consistency >= rules.consistency
            and s.modal_peak not in function_words):
        return "Semantic", s.modal_peak, 1
    if (s.function_share >= rules.say_function_share
            and s.peak_consistency >= rules.say_consistency and depth >= rules.late_depth):
        return "Say X", f"say {say_name if say_name is not None else s.modal_peak}", 2
    if s.sparsity < rules.dense_sparsity:
        return "Relationship", s.modal_peak, 3
    if depth < rules.early_depth or s.function_share < 0.5:
        return "Semantic", s.modal_peak, 4
    return "Review", "", 5


def supernodes(labels: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[int]]:
    """Indices of the features sharing each (category, name); Review features stay alone."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (category, name) in enumerate(labels):
        key = (category, name if category != "Review" else f"#{i}")
        groups.setdefault(key, []).append(i)
    return groups


def logit_lens_names(model, params, tc_params, features: Iterable[tuple[int, int]],
                     vocabulary: Sequence[str]) -> list[str]:
    """The token each feature's decoder vector promotes most: the vector written as the
    residual stream after the last layer (the family's last residual site), read through
    the model's final norm and unembedding. For the decoder that is ``argmax (w_dec * g)
    W_U`` with ``g`` the final norm's weight (the norm's ``1 / rms`` is a positive factor)."""
    features = list(features)
    structure = require(model, HasLayers, "logit_lens_names").layer_structure()
    n_layers, last = structure.n_layers, structure.residual[-1]
    vectors = jnp.stack([tc_params["W_dec"][layer, feature] for layer, feature in features])
    value = jnp.broadcast_to(vectors[None, None], (n_layers, 1, *vectors.shape))
    mask = (jnp.arange(n_layers) == n_layers - 1).astype(jnp.float32)[:, None, None, None]
    tokens = jnp.zeros((1, len(features)), jnp.int32)  # every position is overwritten
    logits = intervene(model, params, tokens,
                       interventions={last: Intervention.patch(value, mask=mask)})[0]
    return [vocabulary[int(i)] for i in jnp.argmax(logits, axis=-1)]


# ---------------------------------------------------------------------------------------
# Baseline comparison and transfer.


def geometric_clusters(decoder_vectors: np.ndarray, n_clusters: int, seed: int = 0
                       ) -> list[list[int]]:
    """K-means on unit-normalized decoder vectors (the geometric-clustering baseline)."""
    from sklearn.cluster import KMeans

    v = np.asarray(decoder_vectors, np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    n_clusters = max(1, min(n_clusters, len(v)))
    labels = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(v)
    return [list(np.flatnonzero(labels == k)) for k in range(n_clusters)]


def group_peak_consistency(groups: Iterable[Sequence[int]], peak_tokens: Sequence[Sequence[str]]
                           ) -> float:
    """Mean over groups of >= 2 features of the pooled peak-token consistency: the share of
    all its features' peaks (over probes where they fire) equal to the group's modal peak.
    ``peak_tokens[i]``: feature ``i``'s peak token on each probe where it fires."""
    values = []
    for group in groups:
        if len(group) < 2:
            continue
        pooled = [t for i in group for t in peak_tokens[i]]
        if pooled:
            values.append(collections.Counter(pooled).most_common(1)[0][1] / len(pooled))
    return float(np.mean(values)) if values else float("nan")


def group_profile_similarity(groups: Iterable[Sequence[int]], profiles: np.ndarray) -> float:
    """Mean over groups of >= 2 features of the mean pairwise Pearson correlation of the
    features' activation profiles (``profiles[i]``: feature ``i`` flattened over probes
    and positions); constant profiles are skipped."""
    values = []
    for group in groups:
        if len(group) < 2:
            continue
        block = np.asarray(profiles)[list(group)]
        block = block[block.std(axis=1) > 0]
        if len(block) < 2:
            continue
        corr = np.corrcoef(block)
        values.append(corr[np.triu_indices(len(block), 1)].mean())
    return float(np.mean(values)) if values else float("nan")


def peak_tokens(activations: np.ndarray, words: Sequence[Sequence[str]],
                features: Iterable[tuple[int, int]]) -> list[list[str]]:
    """Each feature's peak token on every probe where it fires."""
    out = []
    for layer, feature in features:
        profile = activations[:, layer, :, feature]
        out.append([words[i][int(np.argmax(profile[i]))]
                    for i in np.flatnonzero(profile.max(axis=1) > 0)])
    return out


def transfer_by_layer(original: Iterable[tuple[int, int]], swapped: Iterable[tuple[int, int]],
                      n_layers: int) -> dict[int, float]:
    """Per layer, the share of the original circuit's ``(layer, feature)`` that are also in
    the circuit of the entity-swapped prompt (NaN for a layer with no original feature)."""
    original, swapped = set(map(tuple, original)), set(map(tuple, swapped))
    rates = {}
    for layer in range(n_layers):
        mine = {f for f in original if f[0] == layer}
        rates[layer] = len(mine & swapped) / len(mine) if mine else float("nan")
    return rates


def category_counts(labels: Sequence[tuple[str, str]], layers: Sequence[int], n_layers: int
                    ) -> Mapping[str, list[int]]:
    """``{category: [count in layer 0, layer 1, ...]}``."""
    counts = {c: [0] * n_layers for c in CATEGORIES}
    for (category, _), layer in zip(labels, layers, strict=True):
        counts[category][layer] += 1
    return counts
