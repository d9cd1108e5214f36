"""scikit-learn's handwritten digits as a tfds dataset, with class splits and rotations.

The 1,797 8x8 images of ``sklearn.datasets.load_digits`` (nothing downloaded) are split
per class with a seeded permutation. Splits: ``train`` and ``test`` (the seen
``classes``), ``heldout`` (every image of the other classes). Every image appears once
per angle in ``angles``: multiples of 90 are exact ``np.rot90`` turns, others bilinear
``scipy.ndimage.rotate``.

Features: ``inputs`` (float32, 64, in [0, 1], row-major), ``label`` (int32), ``angle``
(float32, degrees), ``index`` (int32). Key names: :class:`Digits`, :func:`build_digits`,
:func:`split_indices`, :func:`rotate_image`.

Design notes: docs/training.md ("Handwritten digits").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.ndimage
import tensorflow_datasets as tfds
from mechinterp.train.data import _config_name, prepare
from sklearn.datasets import load_digits

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8)
MAX_PIXEL = 16.0  # load_digits pixels are integers 0..16


def rotate_image(image: np.ndarray, degrees: float) -> np.ndarray:
    """``image`` (H, W) rotated counterclockwise by ``degrees`` about its center.

    Multiples of 90 degrees are exact (``np.rot90``); other angles are bilinear
    (``scipy.ndimage.rotate(order=1, reshape=False, mode='grid-constant')``: zeros
    outside the frame, blended bilinearly with the edge pixels).
    """
    if not math.isfinite(degrees):
        raise ValueError(f"rotation angle must be finite, got {degrees}")
    quarter_turns, rest = divmod(float(degrees), 90.0)
    if rest == 0.0:
        return np.rot90(image, int(quarter_turns) % 4)
    return scipy.ndimage.rotate(image, degrees, reshape=False, order=1, mode="grid-constant",
                                cval=0.0)


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    """Which classes are seen, the test fraction, the rotation angles and the seed."""

    classes: tuple[int, ...] = tuple(range(NUM_CLASSES))
    angles: tuple[float, ...] = (0.0,)
    test_fraction: float = 0.25
    seed: int = 0


def split_indices(labels: np.ndarray, test_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: per class, a seeded permutation puts
    ``round(test_fraction * n_class)`` images in test. Both sorted."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(NUM_CLASSES):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * len(rows))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def split_rows(config: DigitsConfig, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of ``load_digits`` in each split (before rotation), sorted."""
    train, test = split_indices(labels, config.test_fraction, config.seed)
    seen = np.isin(labels, config.classes)
    return {"train": train[seen[train]], "test": test[seen[test]],
            "heldout": np.flatnonzero(~seen)}


class Digits(tfds.core.GeneratorBasedBuilder):
    """The digits dataset of the module docstring (one config directory per setting)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    code_path = None  # nothing to download, no checksums file (see data.SyntheticTasks)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"sklearn digits, classes {config.classes}, angles {config.angles}",
            features=tfds.features.FeaturesDict({
                "inputs": tfds.features.Tensor(shape=(math.prod(IMAGE_SHAPE),),
                                               dtype=np.float32),
                "label": np.int32,
                "angle": np.float32,
                "index": np.int32,
            }),
            metadata=tfds.core.MetadataDict(classes=list(config.classes),
                                            angles=list(config.angles)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        digits = load_digits()
        rows = split_rows(self.builder_config, digits.target)
        return {split: self._generate_examples(digits.images, digits.target, r)
                for split, r in rows.items() if len(r)}  # tfds refuses empty splits

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray):
        for row in rows:
            for a, angle in enumerate(self.builder_config.angles):
                image = rotate_image(images[row] / MAX_PIXEL, angle)
                yield f"{row}_{a}", {"inputs": image.astype(np.float32).reshape(-1),
                                     "label": np.int32(labels[row]),
                                     "angle": np.float32(angle), "index": np.int32(row)}


def _check(classes: Sequence[int], angles: Sequence[float], test_fraction: float) -> None:
    if not classes or len(set(classes)) != len(classes) or not all(
            isinstance(c, (int, np.integer)) and 0 <= c < NUM_CLASSES for c in classes):
        raise ValueError(f"classes must be distinct digits 0..9 (at least one), got {classes}")
    if not angles or not all(math.isfinite(a) for a in angles):
        raise ValueError(f"angles must be finite degrees (at least one), got {angles}")
    if len(set(angles)) != len(angles):
        raise ValueError(f"angles {angles} repeat; each rotated copy would appear twice")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def build_digits(*, data_dir: str | Path, classes: Sequence[int] = tuple(range(NUM_CLASSES)),
                 angles: Sequence[float] = (0.0,), test_fraction: float = 0.25,
                 seed: int = 0) -> Digits:
    """Generate (once) and return the digits builder for these settings.

    ``classes``: the digits in train and test (the rest form ``heldout``); ``angles``:
    rotated copies, in degrees; ``test_fraction``: of each seen class's images; ``seed``:
    the train/test permutation.
    """
    _check(classes, angles, test_fraction)
    classes = tuple(sorted(int(c) for c in classes))
    angles = tuple(float(a) for a in angles)
    config = DigitsConfig(name=_config_name("digits", classes, angles, test_fraction, seed),
                          classes=classes, angles=angles, test_fraction=test_fraction,
                          seed=seed)
    return prepare(Digits, config, data_dir)
