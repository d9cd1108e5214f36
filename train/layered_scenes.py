"""Layered images with ground-truth layers, as tfds datasets: scenes (a textured background
under RGBA foregrounds that carry their own soft shadow and reflection) and illustrations
(flat colour, shadow, highlight and line-art layers combined by blend modes).

Layers use straight (not premultiplied) alpha, RGBA in [0, 1]. A layer with alpha ``a`` and
colour ``f`` over a base ``b`` gives ``(1 - a) b + a B(b, f)``, ``B`` the blend mode:
normal ``f``, multiply ``b f``, screen ``1 - (1 - b)(1 - f)``. The compositing functions
are plain arithmetic, so they take NumPy or JAX arrays (the consistency losses use them).
A scene's foregrounds are listed bottom to top; each one's alpha holds the object, its
shadow and its reflection (the visual effects belong to the foreground, as in LayerDecomp).
Key names: :func:`build_scenes`, :func:`build_illustrations`, :func:`arrays`,
:func:`composite`, :func:`blend`, :func:`merge_over`.
"""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from mechinterp.train.data import _config_name, prepare

OBJECT_SHAPES = ("disk", "square", "diamond")
BLEND_MODES = ("normal", "multiply", "screen")
ILLUSTRATION_LAYERS = ("flat", "shadow", "highlight", "line")  # production order
ILLUSTRATION_MODES = ("normal", "multiply", "screen", "normal")


def blend(mode: str, layer, base):
    """``layer`` (..., 4) straight-alpha RGBA blended onto ``base`` (..., 3) RGB."""
    f, a = layer[..., :3], layer[..., 3:]
    mixed = {"normal": lambda: f, "multiply": lambda: base * f,
             "screen": lambda: 1 - (1 - base) * (1 - f)}
    if mode not in mixed:
        raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
    return (1 - a) * base + a * mixed[mode]()


def composite(background, layers, modes=None):
    """``layers`` (..., L, H, W, 4), bottom to top, blended onto ``background`` (..., H, W,
    3); ``modes`` (one name per layer) default to ``normal`` (alpha compositing)."""
    modes = modes or ("normal",) * layers.shape[-4]
    if len(modes) != layers.shape[-4]:
        raise ValueError(f"{layers.shape[-4]} layers but {len(modes)} blend modes")
    out = background
    for k, mode in enumerate(modes):
        out = blend(mode, layers[..., k, :, :, :], out)
    return out


def merge_over(top, bottom):
    """One straight-alpha RGBA layer equal to ``top`` over ``bottom`` (Porter-Duff over):
    ``over(merge_over(t, b), x) == over(t, over(b, x))`` for every ``x``."""
    at, ab = top[..., 3:], bottom[..., 3:]
    a = at + ab * (1 - at)
    premultiplied = top[..., :3] * at + bottom[..., :3] * ab * (1 - at)
    xp = jnp if isinstance(a, jax.Array) else np
    return xp.concatenate([premultiplied / (a + (a == 0)), a], -1)


def _grid(size: int):
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="ij")


def shape_alpha(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    """Anti-aliased coverage (size, size) of a shape centred at (cy, cx), radius r (image
    coordinates in [-1, 1]); the edge ramps over one pixel."""
    y, x = _grid(size)
    dy, dx = y - cy, x - cx
    dist = {"disk": np.hypot(dy, dx), "square": np.maximum(abs(dy), abs(dx)) / 0.85,
            "diamond": (abs(dy) + abs(dx)) / 1.25}[shape]
    return np.clip((r - dist) * size / 2 + 0.5, 0.0, 1.0)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    k = np.arange(-3, 4)
    w = np.exp(-0.5 * (k / sigma) ** 2)
    w /= w.sum()
    pad = np.pad(a, 3, mode="constant")
    rows = sum(wi * pad[:, 3 + i:3 + i + a.shape[1]] for i, wi in zip(k, w))
    return sum(wi * rows[3 + i:3 + i + a.shape[0], :] for i, wi in zip(k, w))


def _colour(rng, value=(0.7, 1.0)) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0),
                                        rng.uniform(*value)))


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A textured background (size, size, 3): two colours mixed by a tilted sinusoid."""
    y, x = _grid(size)
    theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.0, 3.0), rng.uniform(0, 2 * np.pi)
    t = 0.5 + 0.5 * np.sin(freq * np.pi * (np.cos(theta) * x + np.sin(theta) * y) + phase)
    c0, c1 = _colour(rng, (0.3, 0.8)), _colour(rng, (0.3, 0.8))
    return t[..., None] * c0 + (1 - t[..., None]) * c1


def foreground(size: int, rng: np.random.Generator, *, shape: int, shadow: bool,
               reflection: bool, colour=None) -> tuple[np.ndarray, np.ndarray]:
    """``(layer, object_alpha)``: one RGBA foreground (size, size, 4), the object over its
    soft shadow (down-right, blurred, black at 0.5 opacity) and its reflection (the object
    mirrored below itself, fading), and the object's own coverage (size, size). ``colour``
    (RGB) defaults to a random saturated one."""
    r = rng.uniform(0.25, 0.4)
    cy, cx = rng.uniform(-0.45, 0.25), rng.uniform(-0.5, 0.5)
    name = OBJECT_SHAPES[shape]
    obj_a = shape_alpha(name, size, cy, cx, r)
    colour = _colour(rng) if colour is None else np.asarray(colour, np.float64)
    layer = np.concatenate([np.broadcast_to(colour, obj_a.shape + (3,)), obj_a[..., None]], -1)
    below = np.zeros(obj_a.shape + (4,))
    if reflection:
        y, _ = _grid(size)
        fade = np.clip(1 - (y - (cy + r)) / (1.5 * r), 0, 1) * (y > cy + r)
        mirror = shape_alpha(name, size, cy + 2 * r, cx, r) * fade * 0.45
        below = np.concatenate([layer[..., :3], mirror[..., None]], -1)
    if shadow:
        dark = _blur(shape_alpha(name, size, cy + 0.4 * r, cx + 0.4 * r, r), 1.0) * 0.5
        below = merge_over(below, np.concatenate([np.zeros(obj_a.shape + (3,)),
                                                  dark[..., None]], -1))
    return merge_over(layer, below), obj_a


def scene(size: int, rng: np.random.Generator, *, n_foregrounds: int = 1, shadow: bool = True,
          reflection: bool = True, min_foregrounds: int | None = None, palette=(),
          plain: bool = False) -> dict:
    """One scene as float32 arrays: ``inputs`` (the composite), ``background``,
    ``foregrounds`` (K, size, size, 4) bottom to top, ``masks`` (K, size, size: each object's
    own coverage), ``labels`` (K: shape ids in :data:`OBJECT_SHAPES`) and ``colours`` (K:
    indices into ``palette``, distinct; -1 without a palette). With ``min_foregrounds`` the
    scene has between that many and K objects; absent ones (the last layers) are fully
    transparent with label and colour -1. ``plain``: a uniform grey background."""
    n = n_foregrounds if min_foregrounds is None else int(
        rng.integers(min_foregrounds, n_foregrounds + 1))
    bg = np.full((size, size, 3), rng.uniform(0.1, 0.3)) if plain else background(size, rng)
    labels = np.full(n_foregrounds, -1)
    colours = np.full(n_foregrounds, -1)
    labels[:n] = rng.integers(len(OBJECT_SHAPES), size=n)
    if palette:
        colours[:n] = rng.permutation(len(palette))[:n]
    fgs = np.zeros((n_foregrounds, size, size, 4))
    masks = np.zeros((n_foregrounds, size, size))
    for k in range(n):
        fgs[k], masks[k] = foreground(size, rng, shape=int(labels[k]), shadow=shadow,
                                      reflection=reflection,
                                      colour=palette[colours[k]] if palette else None)
    return {"inputs": composite(bg, fgs).astype(np.float32),
            "background": bg.astype(np.float32), "foregrounds": fgs.astype(np.float32),
            "masks": masks.astype(np.float32), "labels": labels.astype(np.int32),
            "colours": colours.astype(np.int32)}


def illustration(size: int, rng: np.random.Generator, *, shuffle: bool = True) -> dict:
    """One illustration: ``layers`` (4, size, size, 4) of kinds :data:`ILLUSTRATION_LAYERS`
    in production order, ``order`` (4: the kinds bottom to top; flat colour stays at the
    bottom, the other three are permuted when ``shuffle``), ``inputs`` the composite on
    white paper, each kind blended with its mode in :data:`ILLUSTRATION_MODES`."""
    shape = OBJECT_SHAPES[rng.integers(len(OBJECT_SHAPES))]
    r, cy, cx = rng.uniform(0.45, 0.65), rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)
    body = shape_alpha(shape, size, cy, cx, r)
    inner = shape_alpha(shape, size, cy, cx, r - 4 / size)
    dy, dx = rng.choice([-1, 1], 2) * rng.uniform(0.4, 0.6, 2) * r
    shade = body * (1 - shape_alpha(shape, size, cy - dy, cx - dx, r))  # crosses the line
    light = shape_alpha("disk", size, cy + 0.4 * dy, cx + 0.4 * dx, 0.45 * r)  # and the shade
    line = np.clip(body - inner, 0, 1)
    colours = [_colour(rng), _colour(rng, (0.3, 0.7)), _colour(rng, (0.9, 1.0)) * 0.3 + 0.7,
               _colour(rng, (0.0, 0.2))]
    layers = np.stack([np.concatenate([np.broadcast_to(c, a.shape + (3,)), a[..., None]], -1)
                       for c, a in zip(colours, (body, shade, light, line))])
    order = np.concatenate([[0], 1 + rng.permutation(3) if shuffle else [1, 2, 3]])
    paper = np.ones((size, size, 3))
    out = composite(paper, layers[order], [ILLUSTRATION_MODES[k] for k in order])
    return {"inputs": out.astype(np.float32), "layers": layers.astype(np.float32),
            "order": order.astype(np.int32)}


@dataclasses.dataclass(eq=False)
class LayeredConfig(tfds.core.BuilderConfig):
    """``kind`` ("scenes" or "illustrations"), image size, counts, seed and scene options."""

    kind: str = "scenes"
    size: int = 16
    n_train: int = 256
    n_test: int = 64
    seed: int = 0
    n_foregrounds: int = 1
    shadow: bool = True
    reflection: bool = True
    min_foregrounds: int | None = None
    palette: tuple = ()
    plain: bool = False
    shuffle: bool = True


class Layered(tfds.core.GeneratorBasedBuilder):
    """Layered scenes or illustrations (module docstring), one config directory per setting."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    code_path = None  # nothing to download, no checksums file (see data.SyntheticTasks)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        s, k = c.size, c.n_foregrounds
        image = tfds.features.Tensor(shape=(s, s, 3), dtype=np.float32)
        if c.kind == "scenes":
            features = {"inputs": image, "background": image,
                        "foregrounds": tfds.features.Tensor(shape=(k, s, s, 4), dtype=np.float32),
                        "masks": tfds.features.Tensor(shape=(k, s, s), dtype=np.float32),
                        "labels": tfds.features.Tensor(shape=(k,), dtype=np.int32),
                        "colours": tfds.features.Tensor(shape=(k,), dtype=np.int32)}
        else:
            features = {"inputs": image,
                        "layers": tfds.features.Tensor(shape=(4, s, s, 4), dtype=np.float32),
                        "order": tfds.features.Tensor(shape=(4,), dtype=np.int32)}
        return tfds.core.DatasetInfo(builder=self, description=f"layered {c.kind}",
                                     features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {"train": self._generate_examples("train", c.n_train),
                "test": self._generate_examples("test", c.n_test)}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        rng = np.random.default_rng([c.seed, split == "test"])
        for k in range(n):
            if c.kind == "scenes":
                yield k, scene(c.size, rng, n_foregrounds=c.n_foregrounds, shadow=c.shadow,
                               reflection=c.reflection, min_foregrounds=c.min_foregrounds,
                               palette=c.palette, plain=c.plain)
            else:
                yield k, illustration(c.size, rng, shuffle=c.shuffle)


def _build(data_dir, **settings) -> Layered:
    c = LayeredConfig(name=_config_name("layered", *sorted(settings.items())), **settings)
    if c.size < 8 or c.n_train < 1 or c.n_test < 1 or c.n_foregrounds < 1:
        raise ValueError(f"need size >= 8, n_train >= 1, n_test >= 1, n_foregrounds >= 1; got "
                         f"size={c.size}, n_train={c.n_train}, n_test={c.n_test}, "
                         f"n_foregrounds={c.n_foregrounds}")
    return prepare(Layered, c, data_dir)


def build_scenes(*, data_dir: str | Path, size: int = 16, n_train: int = 256, n_test: int = 64,
                 n_foregrounds: int = 1, shadow: bool = True, reflection: bool = True,
                 min_foregrounds: int | None = None, palette=(), plain: bool = False,
                 seed: int = 0) -> Layered:
    """Generate (once) and return the layered-scenes builder for these settings (options
    as in :func:`scene`)."""
    palette = tuple(tuple(float(v) for v in c) for c in palette)
    if palette and len(palette) < n_foregrounds:
        raise ValueError(f"a palette of {len(palette)} colours cannot colour "
                         f"{n_foregrounds} foregrounds distinctly; give at least that many")
    return _build(data_dir, kind="scenes", size=size, n_train=n_train, n_test=n_test,
                  n_foregrounds=n_foregrounds, shadow=shadow, reflection=reflection,
                  min_foregrounds=min_foregrounds, palette=palette, plain=plain, seed=seed)


def build_illustrations(*, data_dir: str | Path, size: int = 16, n_train: int = 256,
                        n_test: int = 64, shuffle: bool = True, seed: int = 0) -> Layered:
    """Generate (once) and return the illustration-layers builder for these settings."""
    return _build(data_dir, kind="illustrations", size=size, n_train=n_train, n_test=n_test,
                  shuffle=shuffle, seed=seed)


def arrays(builder: Layered, split: str) -> dict[str, np.ndarray]:
    """Every example of ``split`` stacked: ``{feature: (n, ...)}``."""
    source = builder.as_data_source(split)
    rows = source.__getitems__(range(len(source)))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
