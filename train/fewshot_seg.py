"""Binary few-shot segmentation episodes over synthetic domains with disjoint class sets.

Every image holds one object of its class (the mask) and a distractor of another class of
its domain: a model must be told (supports, or a per-class layer) which one to segment.

- ``source``: disk / square / triangle, saturated colours, textured background (stripes,
  checks or blotches of :mod:`mechinterp.train.images`).
- ``shapes_shift``: cross / ring / bar, dark on a bright checked background, heavy noise.
- ``medical``: grey "scan" of smoothed tissue noise with a bright round lesion, a dark
  elongated (rotated) lesion or a speckled lesion.
- ``remote``: a 4 x 4 grid of tiles of water (smooth blue), field (green stripes at an
  angle) or urban (grey blocks); the mask is every tile of the class (2 to 6 of them).

Each (domain, class, split) has its own seeded generator (:func:`make_pool`).
"""

from __future__ import annotations

import colorsys

import numpy as np
import scipy.ndimage

from mechinterp.train.images import _background
from mechinterp.train.shapes import _shape_mask

DOMAINS = {"source": ("disk", "square", "triangle"), "shapes_shift": ("cross", "ring", "bar"),
           "medical": ("round", "oval", "speckled"), "remote": ("water", "field", "urban")}
TARGETS = ("shapes_shift", "medical", "remote")


def _grid(size: int):
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(coords, coords, indexing="ij")


def _two_places(rng: np.random.Generator):
    """Centres (cy, cx) of the object and the distractor, in opposite halves."""
    side = rng.choice([-1.0, 1.0])
    ys = rng.uniform(-0.35, 0.35, 2)
    xs = np.array([side, -side]) * rng.uniform(0.4, 0.55, 2)
    return list(zip(ys, xs))


def _shapes(domain: str, cls: int, size: int, rng: np.random.Generator):
    names = DOMAINS[domain]
    other = names[(cls + 1 + rng.integers(len(names) - 1)) % len(names)]
    y, x = _grid(size)
    masks = [_shape_mask(name, y - cy, x - cx, rng.uniform(0.3, 0.42))
             for name, (cy, cx) in zip((names[cls], other), _two_places(rng))]
    if domain == "source":
        hue = rng.uniform()
        bg = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1, 0.5, 0.45))
        image = (0.5 + 0.5 * _background(size, rng))[..., None] * bg
        for m in masks:
            fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
            image = np.where(m[..., None], np.array(fg), image)
        noise = 0.03
    else:
        i, j = np.mgrid[:size, :size]
        period = rng.integers(2, 5)
        image = np.repeat((0.75 + 0.2 * ((i // period + j // period) % 2))[..., None], 3, -1)
        for m in masks:
            image = np.where(m[..., None], rng.uniform(0.0, 0.3, 3), image)
        noise = 0.12
    return image + rng.normal(0, noise, image.shape), masks[0]


def _medical(cls: int, size: int, rng: np.random.Generator):
    y, x = _grid(size)
    tissue = scipy.ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0)
    image = 0.4 + 0.4 * tissue / (np.abs(tissue).max() + 1e-9)
    other = (cls + 1 + rng.integers(2)) % 3
    target = None
    for kind, (cy, cx) in zip((cls, other), _two_places(rng)):
        r = rng.uniform(0.25, 0.38)
        if kind == 1:                       # oval: dark, elongated, rotated
            a = rng.uniform(0, np.pi)
            u = (x - cx) * np.cos(a) + (y - cy) * np.sin(a)
            v = -(x - cx) * np.sin(a) + (y - cy) * np.cos(a)
            mask = (u / (1.4 * r)) ** 2 + (v / (0.5 * r)) ** 2 < 1
            image = np.where(mask, 0.1 + 0.1 * image, image)
        else:
            d = np.hypot(y - cy, x - cx)
            mask = d < r
            value = (0.9 - 0.3 * (d / r) ** 2 if kind == 0
                     else 0.5 + 0.45 * (rng.uniform(size=d.shape) > 0.5))
            image = np.where(mask, value, image)
        target = mask if target is None else target
    image = image + rng.normal(0, 0.04, image.shape)
    return np.repeat(image[..., None], 3, -1), target


def _tile(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    i, j = np.mgrid[:n, :n].astype(np.float64)
    if kind == 0:                           # water: smooth blue
        base = np.array([0.1, 0.25, 0.6]) * rng.uniform(0.8, 1.2)
        return base + 0.03 * rng.normal(size=(n, n, 1))
    if kind == 1:                           # field: green stripes at an angle
        a = rng.uniform(0, np.pi)
        s = 0.5 + 0.5 * np.sin(2 * np.pi * (i * np.cos(a) + j * np.sin(a)) / 3.0)
        return np.array([0.3, 0.6, 0.15]) * (0.6 + 0.4 * s)[..., None]
    blocks = rng.uniform(0.35, 0.75, (2, 2))  # urban: grey blocks with dark streets
    grey = np.kron(blocks, np.ones((n // 2 + 1, n // 2 + 1)))[:n, :n]
    grey = np.where((i % (n // 2) == 0) | (j % (n // 2) == 0), 0.15, grey)
    return np.repeat(grey[..., None], 3, -1)


def _remote(cls: int, size: int, rng: np.random.Generator):
    n = size // 4
    kinds = rng.choice([k for k in range(3) if k != cls], 16)
    kinds[rng.permutation(16)[:rng.integers(2, 7)]] = cls
    kinds = kinds.reshape(4, 4)
    image = np.zeros((size, size, 3))
    for a in range(4):
        for b in range(4):
            image[a * n:(a + 1) * n, b * n:(b + 1) * n] = _tile(kinds[a, b], n, rng)
    mask = np.kron(kinds == cls, np.ones((n, n), bool))
    return image + rng.normal(0, 0.03, image.shape), mask


def render(domain: str, cls: int, size: int, rng: np.random.Generator):
    """``(image (size, size, 3) float32 in [0, 1], mask (size, size) bool)``: one image of
    class ``cls`` (an index into ``DOMAINS[domain]``) with a distractor."""
    if domain == "medical":
        image, mask = _medical(cls, size, rng)
    elif domain == "remote":
        image, mask = _remote(cls, size, rng)
    else:
        image, mask = _shapes(domain, cls, size, rng)
    return np.clip(image, 0, 1).astype(np.float32), np.asarray(mask, bool)


def make_pool(domain: str, *, size: int = 32, per_class: int = 40, split: str = "train",
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images (classes, per_class, size, size, 3), masks (classes, per_class, size,
    size))`` of one split (``train`` or ``test``) of ``domain``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown few-shot domain {domain!r}; known: {tuple(DOMAINS)}")
    if split not in ("train", "test") or size < 16 or size % 8 or per_class < 1:
        raise ValueError(f"need split 'train' or 'test', size a multiple of 8 >= 16 and "
                         f"per_class >= 1; got split={split!r}, size={size}, "
                         f"per_class={per_class}")
    images, masks = [], []
    for cls in range(len(DOMAINS[domain])):
        rng = np.random.default_rng([seed, list(DOMAINS).index(domain), cls, split == "test"])
        drawn = [render(domain, cls, size, rng) for _ in range(per_class)]
        images.append(np.stack([d[0] for d in drawn]))
        masks.append(np.stack([d[1] for d in drawn]))
    return np.stack(images), np.stack(masks)


def episodes(images: np.ndarray, masks: np.ndarray, *, batch: int, shots: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``batch`` episodes from a pool: per episode a class, ``shots`` support images and one
    query of it, all distinct: ``query (batch, H, W, 3)``, ``query_mask (batch, H, W)``,
    ``support (batch, shots, H, W, 3)``, ``support_mask (batch, shots, H, W)``."""
    n_classes, per_class = images.shape[:2]
    if shots + 1 > per_class:
        raise ValueError(f"an episode needs shots + 1 = {shots + 1} images of a class; the "
                         f"pool has {per_class} per class")
    cls = rng.integers(n_classes, size=batch)
    picks = np.stack([rng.permutation(per_class)[:shots + 1] for _ in range(batch)])
    return {"query": images[cls, picks[:, 0]], "query_mask": masks[cls, picks[:, 0]],
            "support": images[cls[:, None], picks[:, 1:]],
            "support_mask": masks[cls[:, None], picks[:, 1:]]}


def augment(images: np.ndarray, masks: np.ndarray, n: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` flipped / rotated / shifted copies of a few images and their masks (the
    training set a student gets from its shots); the first ``len(images)`` are the shots."""
    k = rng.integers(len(images), size=n)
    k[:len(images)] = np.arange(min(n, len(images)))
    out_x, out_m = [], []
    for idx, i in enumerate(k):
        x, m = images[i], masks[i]
        if idx >= len(images):
            rot, flip, shift = rng.integers(4), rng.integers(2), rng.integers(-4, 5, 2)
            x, m = np.rot90(x, rot), np.rot90(m, rot)
            if flip:
                x, m = x[:, ::-1], m[:, ::-1]
            x, m = np.roll(x, shift, (0, 1)), np.roll(m, shift, (0, 1))
        out_x.append(x)
        out_m.append(m)
    return np.stack(out_x).astype(np.float32), np.stack(out_m)
