"""Sample quality without FID: a small CNN judge trained here on the real images gives
per-class accuracy of generated samples (the class each was conditioned on) and a
Fréchet distance between its pooled features of samples and of real test images
(``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, FID's formula on another
network's features: not comparable with FID numbers)."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from mechinterp import capture
from mechinterp.experiments.kit.classifier import Classifier
from mechinterp.models.cnn import CNN


class Judge:
    """A CNN classifier of ``(images in [0, 1], labels)``; ``test_accuracy`` on real data."""

    def __init__(self, config, data: dict, n_classes: int):
        j = config.judge
        self.model = CNN(n_classes=n_classes, width=j.width, n_layers=j.n_layers, norm=False,
                         scan_layers=False)
        trainer = Classifier(self.model, steps=j.steps, batch_size=j.batch_size,
                             learning_rate=j.learning_rate)
        x, y = data["train"]
        variables, _ = trainer.fit(trainer.init(config.seed, x), x, y, config.seed)
        self.params = variables["params"]
        self.test_accuracy = trainer.accuracy(variables, *data["test"])

    def logits_and_features(self, images) -> tuple[np.ndarray, np.ndarray]:
        logits, cache = capture(self.model, self.params, np.asarray(images, np.float32),
                                sites=["pooled"])
        return np.asarray(logits), np.asarray(cache["pooled"], np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (n, d)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * root))


def sample_quality(judge: Judge, samples, labels, real_features: np.ndarray,
                   n_classes: int) -> dict:
    """``accuracy`` (all samples), ``per_class`` accuracy and ``frechet`` to real data."""
    logits, features = judge.logits_and_features(samples)
    correct = logits.argmax(-1) == np.asarray(labels)
    per_class = [float(correct[labels == c].mean()) for c in range(n_classes)]
    return {"accuracy": float(correct.mean()), "per_class": per_class,
            "frechet": frechet_distance(features, real_features)}
