"""Procedurally drawn images (shape x texture x palette) as a tfds dataset, with class splits
and task pairs at a controllable distance.

A class is one :data:`SHAPES` x :data:`TEXTURES` x :data:`PALETTES` combination (48 in all,
ids in that product order); each image draws its position, size, hue, brightness,
texture phase, background and pixel noise from a seeded generator, so a config always
yields the same images. :func:`task_pair` picks two disjoint 5-class tasks A and B that
share every primitive (``"near"``: same shapes and palette, textures swapped between the
shapes) or none (``"far"``: other shapes, other textures, other palette).

Features: ``inputs`` (float32, (size, size, 3), in [0, 1]), ``label`` (int32: the position
of the image's class in ``classes``), ``class_id`` (int32). Splits ``train`` and ``test``.
Key names: :func:`build_shapes`, :func:`render`, :func:`task_pair`.
"""

from __future__ import annotations

import colorsys
import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from mechinterp.train.data import _config_name, prepare

SHAPES = ("disk", "square", "triangle", "cross", "ring", "bar")
TEXTURES = ("solid", "hstripes", "vstripes", "checker")
PALETTES = ("warm", "cool")
CLASSES = tuple(itertools.product(SHAPES, TEXTURES, PALETTES))
_HUES = {"warm": (0.0, 0.12), "cool": (0.5, 0.68)}


def class_id(shape: str, texture: str, palette: str) -> int:
    """The id of a class (its index in :data:`CLASSES`)."""
    return CLASSES.index((shape, texture, palette))


def _shape_mask(shape: str, y: np.ndarray, x: np.ndarray, r: float) -> np.ndarray:
    d = np.hypot(x, y)
    return {"disk": d < r, "ring": (d < r) & (d > 0.5 * r),
            "square": np.maximum(abs(x), abs(y)) < 0.8 * r,
            "triangle": (y < 0.7 * r) & (abs(x) < 0.6 * (y + 0.9 * r)),
            "cross": ((abs(x) < 0.3 * r) | (abs(y) < 0.3 * r)) & (np.maximum(abs(x), abs(y)) < r),
            "bar": (abs(y) < 0.35 * r) & (abs(x) < r)}[shape]


def _texture(texture: str, size: int, phase: int) -> np.ndarray:
    i, j = np.mgrid[:size, :size] + phase
    return {"solid": np.ones((size, size)), "hstripes": (i // 1) % 2, "vstripes": (j // 1) % 2,
            "checker": (i + j) % 2}[texture].astype(np.float64)


def render(cls: int, size: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """One image (size, size, 3) in [0, 1] of class ``cls`` (an id in :data:`CLASSES`)."""
    shape, texture, palette = CLASSES[cls]
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    mask = _shape_mask(shape, y - cy, x - cx, rng.uniform(0.6, 0.85))
    colour = np.array(colorsys.hsv_to_rgb(rng.uniform(*_HUES[palette]), rng.uniform(0.7, 1.0),
                                          rng.uniform(0.75, 1.0)))
    fill = 0.35 + 0.65 * _texture(texture, size, int(rng.integers(2)))
    image = np.full((size, size, 3), rng.uniform(0.0, 0.2))
    image = np.where(mask[..., None], fill[..., None] * colour, image)
    return np.clip(image + rng.normal(0.0, noise, image.shape), 0.0, 1.0).astype(np.float32)


def task_pair(distance: str, seed: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(A, B)``: two disjoint 5-class tasks (class ids) at ``distance`` ``"near"`` or
    ``"far"`` (module docstring); ``seed`` permutes which shapes get which textures."""
    rng = np.random.default_rng(seed)
    if distance == "near":
        shapes = [SHAPES[k] for k in rng.permutation(len(SHAPES))[:5]]
        a_tex, b_tex = (TEXTURES[k] for k in rng.permutation(len(TEXTURES))[:2])
        return (tuple(class_id(s, a_tex if k % 2 else b_tex, "warm") for k, s in enumerate(shapes)),
                tuple(class_id(s, b_tex if k % 2 else a_tex, "warm") for k, s in enumerate(shapes)))
    if distance == "far":
        combos = [list(itertools.product(SHAPES[:3], TEXTURES[:2])),
                  list(itertools.product(SHAPES[3:], TEXTURES[2:]))]
        picks = [[c[k] for k in rng.permutation(len(c))[:5]] for c in combos]
        return (tuple(class_id(s, t, "warm") for s, t in picks[0]),
                tuple(class_id(s, t, "cool") for s, t in picks[1]))
    raise ValueError(f"task distance must be 'near' or 'far', got {distance!r}")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """The classes (ids, in label order), image size, images per class, noise and seed."""

    classes: tuple[int, ...] = tuple(range(5))
    size: int = 8
    n_train: int = 200
    n_test: int = 100
    noise: float = 0.05
    seed: int = 0


class Shapes(tfds.core.GeneratorBasedBuilder):
    """The procedural images of the module docstring (one config directory per setting)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    code_path = None  # nothing to download, no checksums file (see data.SyntheticTasks)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self, description=f"procedural shapes, classes {c.classes}",
            features=tfds.features.FeaturesDict({
                "inputs": tfds.features.Tensor(shape=(c.size, c.size, 3), dtype=np.float32),
                "label": np.int32, "class_id": np.int32}),
            metadata=tfds.core.MetadataDict(classes=[list(CLASSES[k]) for k in c.classes]))

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {"train": self._generate_examples("train", c.n_train),
                "test": self._generate_examples("test", c.n_test)}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        for label, cls in enumerate(c.classes):
            # one generator per (class, split): adding a class leaves the others' images alone
            rng = np.random.default_rng([c.seed, cls, split == "test"])
            for k in range(n):
                yield f"{cls}_{k}", {"inputs": render(cls, c.size, rng, c.noise),
                                     "label": np.int32(label), "class_id": np.int32(cls)}


def build_shapes(*, data_dir: str | Path, classes: Sequence[int], size: int = 8,
                 n_train: int = 200, n_test: int = 100, noise: float = 0.05,
                 seed: int = 0) -> Shapes:
    """Generate (once) and return the shapes builder for these settings (module docstring)."""
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not all(
            0 <= c < len(CLASSES) for c in classes):
        raise ValueError(f"classes must be distinct ids in 0..{len(CLASSES) - 1}, got {classes}")
    if size < 6 or n_train < 1 or n_test < 1 or noise < 0:
        raise ValueError(f"need size >= 6, n_train >= 1, n_test >= 1, noise >= 0; got size="
                         f"{size}, n_train={n_train}, n_test={n_test}, noise={noise}")
    config = ShapesConfig(name=_config_name("shapes", classes, size, n_train, n_test, noise,
                                            seed),
                          classes=classes, size=size, n_train=n_train, n_test=n_test,
                          noise=noise, seed=seed)
    return prepare(Shapes, config, data_dir)
