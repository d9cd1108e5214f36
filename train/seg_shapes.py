"""Synthetic multi-class shape segmentation as a tfds builder: several shapes on a textured
background, a class label per pixel (0 = background, ``k`` = ``shapes[k - 1]``).

Each image draws 1..``n_objects`` shapes (position, size, colour, occlusion order) from a
seeded generator, so a config always yields the same images. The drawing primitives are
:mod:`mechinterp.train.shapes`'s masks and fill textures and :mod:`mechinterp.train.images`'
background textures. The look is a *domain* (:data:`DOMAINS`): ``"plain"`` draws solid,
saturated shapes on a mid-contrast textured background; ``"striped"`` fills shapes with
stripes or checks in a cool palette on a faint background under stronger pixel noise.

Features: ``inputs`` (float32, (size, size, 3), in [0, 1]) and ``mask`` (int32,
(size, size)). Splits ``train`` and ``test``. Key names: :func:`build_seg_shapes`,
:func:`render_scene`, :func:`load_arrays`, :data:`DOMAINS`.
"""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from mechinterp.train.data import SeededSplits, _config_name, prepare
from mechinterp.train.images import _background
from mechinterp.train.shapes import SHAPES, _shape_mask, _texture


@dataclasses.dataclass(frozen=True)
class Domain:
    """How a domain looks: shape fills (:func:`mechinterp.train.shapes._texture` names),
    the hue range of shapes, background contrast and brightness, pixel noise."""

    fills: tuple[str, ...]
    hues: tuple[float, float]
    background_contrast: float
    background_value: float
    noise: float


DOMAINS = {
    "plain": Domain(("solid",), (0.0, 1.0), 0.5, 0.45, 0.03),
    "striped": Domain(("hstripes", "vstripes", "checker"), (0.45, 0.75), 0.2, 0.3, 0.08),
}


def render_scene(size: int, rng: np.random.Generator, *, shapes: tuple[str, ...] = SHAPES,
                 n_objects: int = 3, domain: str = "plain") -> tuple[np.ndarray, np.ndarray]:
    """``(image (size, size, 3) float32 in [0, 1], mask (size, size) int32)``: 1 to
    ``n_objects`` shapes, later ones drawn over earlier ones (the mask follows)."""
    d = DOMAINS[domain]
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    hue = rng.uniform()
    back = colorsys.hsv_to_rgb((hue + 0.5) % 1, 0.4, d.background_value)
    tex = 1 - d.background_contrast + d.background_contrast * _background(size, rng)
    image = tex[..., None] * np.asarray(back)
    mask = np.zeros((size, size), np.int32)
    for _ in range(int(rng.integers(1, n_objects + 1))):
        k = int(rng.integers(len(shapes)))
        cy, cx = rng.uniform(-0.6, 0.6, 2)
        inside = _shape_mask(shapes[k], y - cy, x - cx, rng.uniform(0.25, 0.45))
        colour = np.array(colorsys.hsv_to_rgb(rng.uniform(*d.hues), rng.uniform(0.7, 1.0),
                                              rng.uniform(0.8, 1.0)))
        fill = 0.4 + 0.6 * _texture(d.fills[int(rng.integers(len(d.fills)))], size,
                                    int(rng.integers(2)))
        image = np.where(inside[..., None], fill[..., None] * colour, image)
        mask = np.where(inside, k + 1, mask)
    image = np.clip(image + rng.normal(0.0, d.noise, image.shape), 0.0, 1.0)
    return image.astype(np.float32), mask.astype(np.int32)


@dataclasses.dataclass(eq=False)
class SegShapesConfig(tfds.core.BuilderConfig):
    """Image side, images per split, the shapes (classes 1..), objects per image, domain
    and seed."""

    size: int = 32
    n_train: int = 512
    n_test: int = 256
    shapes: tuple[str, ...] = SHAPES
    n_objects: int = 3
    domain: str = "plain"
    seed: int = 0


class SegShapes(SeededSplits):
    """The scenes of the module docstring (one config directory per setting)."""

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self, description=f"shape segmentation, {c.domain} domain",
            features=tfds.features.FeaturesDict({
                "inputs": tfds.features.Tensor(shape=(c.size, c.size, 3), dtype=np.float32),
                "mask": tfds.features.Tensor(shape=(c.size, c.size), dtype=np.int32)}),
            metadata=tfds.core.MetadataDict(classes=["background", *c.shapes]))

    def example(self, rng: np.random.Generator) -> dict:
        c = self.builder_config
        image, mask = render_scene(c.size, rng, shapes=c.shapes, n_objects=c.n_objects,
                                   domain=c.domain)
        return {"inputs": image, "mask": mask}


def build_seg_shapes(*, data_dir: str | Path, size: int = 32, n_train: int = 512,
                     n_test: int = 256, shapes=SHAPES, n_objects: int = 3,
                     domain: str = "plain", seed: int = 0) -> SegShapes:
    """Generate (once) and return the builder for these settings (module docstring)."""
    shapes = tuple(shapes)
    if domain not in DOMAINS:
        raise ValueError(f"domain {domain!r} is not one of {tuple(DOMAINS)}")
    unknown = [s for s in shapes if s not in SHAPES]
    if not shapes or unknown or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes must be distinct names from {SHAPES}, got {shapes}")
    if size < 8 or n_train < 1 or n_test < 1 or n_objects < 1:
        raise ValueError(f"need size >= 8, n_train >= 1, n_test >= 1, n_objects >= 1; got "
                         f"size={size}, n_train={n_train}, n_test={n_test}, "
                         f"n_objects={n_objects}")
    config = SegShapesConfig(
        name=_config_name("seg_shapes", size, n_train, n_test, shapes, n_objects, domain,
                          seed),
        size=size, n_train=n_train, n_test=n_test, shapes=shapes, n_objects=n_objects,
        domain=domain, seed=seed)
    return prepare(SegShapes, config, data_dir)


def load_arrays(builder: SegShapes, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, size, size, 3), masks (n, size, size))`` of one split, in memory."""
    source = builder.as_data_source(split)
    records = source.__getitems__(range(len(source)))
    return (np.stack([r["inputs"] for r in records]).astype(np.float32),
            np.stack([r["mask"] for r in records]).astype(np.int32))
