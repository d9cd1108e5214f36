"""Labelled image sets for the diffusion families, as tfds builders (nothing downloaded).

``digits``: scikit-learn's 1,797 8x8 digits, bilinearly upsampled to ``size`` x ``size``
(``scipy.ndimage.zoom``, order 1), one channel, label = the digit, train/test split per
class as :func:`mechinterp.train.digits.split_indices`. ``shapes``: one of the six
:data:`mechinterp.train.shapes.SHAPES` (the label) in a random saturated colour, on a
background textured with stripes, checks or blotches in another colour; three channels.

Features: ``inputs`` (float32, (size, size, channels), in [0, 1]) and ``label`` (int32).
Splits ``train`` and ``test``. Key names: :func:`build_images`, :func:`load_images`,
:func:`render_shape_scene`; :data:`KINDS`.
"""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.ndimage
import tensorflow_datasets as tfds
from mechinterp.train.data import _config_name, prepare
from mechinterp.train.digits import MAX_PIXEL, split_indices
from mechinterp.train.shapes import SHAPES, _shape_mask
from sklearn.datasets import load_digits

KINDS = {"digits": (10, 1), "shapes": (len(SHAPES), 3)}  # kind -> (classes, channels)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    i, j = np.mgrid[:size, :size].astype(np.float64)
    period = rng.uniform(2.0, 5.0)
    pattern = rng.integers(3)
    if pattern == 0:                                   # stripes at a random angle
        a = rng.uniform(0, np.pi)
        tex = 0.5 + 0.5 * np.sin(2 * np.pi * (i * np.cos(a) + j * np.sin(a)) / period)
    elif pattern == 1:                                 # checks
        tex = ((i // period + j // period) % 2).astype(np.float64)
    else:                                              # blotches: smoothed noise
        tex = scipy.ndimage.gaussian_filter(rng.normal(size=(size, size)), period / 2)
        tex = (tex - tex.min()) / (np.ptp(tex) + 1e-9)
    return tex


def render_shape_scene(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A coloured shape ``SHAPES[label]`` on a textured background (size, size, 3)."""
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cy, cx = rng.uniform(-0.2, 0.2, 2)
    mask = _shape_mask(SHAPES[label], y - cy, x - cx, rng.uniform(0.5, 0.75))
    hue = rng.uniform()
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)))
    bg = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1, 0.5, 0.45))
    back = (0.5 + 0.5 * _background(size, rng))[..., None] * bg
    return np.where(mask[..., None], fg, back).astype(np.float32)


@dataclasses.dataclass(eq=False)
class ImagesConfig(tfds.core.BuilderConfig):
    """Which kind, the image side, images per class (shapes), test fraction and seed."""

    kind: str = "digits"
    size: int = 16
    per_class: int = 150
    test_fraction: float = 0.25
    seed: int = 0


class Images(tfds.core.GeneratorBasedBuilder):
    """The image sets of the module docstring (one config directory per setting)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    code_path = None  # nothing to download, no checksums file (see data.SyntheticTasks)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        n_classes, channels = KINDS[c.kind]
        return tfds.core.DatasetInfo(
            builder=self, description=f"{c.kind} images, {c.size}x{c.size}",
            features=tfds.features.FeaturesDict({
                "inputs": tfds.features.Tensor(shape=(c.size, c.size, channels),
                                               dtype=np.float32),
                "label": np.int32}),
            metadata=tfds.core.MetadataDict(n_classes=n_classes))

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        if c.kind == "digits":
            digits = load_digits()
            rows = dict(zip(("train", "test"),
                            split_indices(digits.target, c.test_fraction, c.seed)))
            zoom = c.size / 8
            return {s: self._generate_examples(s, (digits.images[r], digits.target[r], zoom))
                    for s, r in rows.items()}
        n_test = max(1, round(c.test_fraction * c.per_class))
        return {"train": self._generate_examples("train", c.per_class - n_test),
                "test": self._generate_examples("test", n_test)}

    def _generate_examples(self, split: str, what):
        c = self.builder_config
        if c.kind == "digits":
            images, labels, zoom = what
            for k, (image, label) in enumerate(zip(images, labels)):
                up = np.clip(scipy.ndimage.zoom(image / MAX_PIXEL, zoom, order=1), 0, 1)
                yield f"{k}", {"inputs": up[..., None].astype(np.float32),
                               "label": np.int32(label)}
            return
        for label in range(len(SHAPES)):
            rng = np.random.default_rng([c.seed, label, split == "test"])
            for k in range(what):
                yield f"{label}_{k}", {"inputs": render_shape_scene(label, c.size, rng),
                                       "label": np.int32(label)}


def build_images(*, data_dir: str | Path, kind: str = "digits", size: int = 16,
                 per_class: int = 150, test_fraction: float = 0.25, seed: int = 0) -> Images:
    """Generate (once) and return the builder for these settings (module docstring);
    ``per_class`` is used by ``shapes`` only (digits has ~180 images per class)."""
    if kind not in KINDS:
        raise ValueError(f"image kind {kind!r} is not one of {tuple(KINDS)}")
    if size < 8 or (kind == "digits" and size % 8) or per_class < 2 or not (
            0 < test_fraction < 1):
        raise ValueError(f"need size >= 8 (a multiple of 8 for digits), per_class >= 2 and "
                         f"0 < test_fraction < 1; got size={size}, per_class={per_class}, "
                         f"test_fraction={test_fraction}")
    config = ImagesConfig(name=_config_name("images", kind, size, per_class, test_fraction,
                                            seed),
                          kind=kind, size=size, per_class=per_class,
                          test_fraction=test_fraction, seed=seed)
    return prepare(Images, config, data_dir)


def load_images(builder: Images, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, size, size, channels), labels (n,))`` of one split, in memory."""
    source = builder.as_data_source(split)
    records = source.__getitems__(range(len(source)))
    return (np.stack([r["inputs"] for r in records]).astype(np.float32),
            np.array([r["label"] for r in records], np.int32))
