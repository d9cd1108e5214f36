"""Metrics of layered generation and decomposition, on NumPy arrays (float64 inside).

Images are (..., H, W, C) in [0, 1]; RGBA layers use straight alpha (see
:mod:`mechinterp.train.layered_scenes`). Every function averages over leading (batch) axes.
Key names: :func:`psnr`, :func:`alpha_iou`, :func:`recomposition_error`,
:func:`pairwise_order_accuracy`, :func:`visible_regions`, :func:`region_adherence`,
:func:`occlusion_order_accuracy`,
:func:`layer_coherence`.
"""

from __future__ import annotations

import numpy as np

from mechinterp.train.layered_scenes import composite


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def psnr(pred, target, peak: float = 1.0) -> float:
    """Mean over images of ``10 log10(peak^2 / MSE)`` (dB); an exact image counts 100 dB."""
    pred, target = _f64(pred, target)
    if pred.shape != target.shape:
        raise ValueError(f"psnr: prediction {pred.shape} and target {target.shape} differ")
    mse = ((pred - target) ** 2).reshape(-1, np.prod(pred.shape[-3:])).mean(-1)
    return float(np.mean(np.where(mse > 0, 10 * np.log10(peak ** 2 / np.maximum(mse, 1e-30)),
                                  100.0)))


def alpha_iou(pred_alpha, target_alpha, threshold: float = 0.5) -> float:
    """Mean over images of the intersection over union of ``alpha > threshold`` (H, W)
    masks; an image where both masks are empty counts 1."""
    p = np.asarray(pred_alpha) > threshold
    t = np.asarray(target_alpha) > threshold
    p, t = p.reshape(-1, np.prod(p.shape[-2:])), t.reshape(-1, np.prod(t.shape[-2:]))
    inter, union = (p & t).sum(-1), (p | t).sum(-1)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def recomposition_error(background, layers, image, modes=None) -> float:
    """MSE between ``image`` and the layers (..., L, H, W, 4) blended onto ``background``
    (bottom to top, ``modes`` default normal): how far predicted layers are from explaining
    the image they were taken from."""
    background, layers, image = _f64(background, layers, image)
    return float(np.mean((composite(background, layers, modes) - image) ** 2))


def pairwise_order_accuracy(pred_order, true_order) -> float:
    """Fraction of pairs of layers stacked in the same relative order; orders are
    (..., L) lists of layer ids bottom to top (permutations of the same ids)."""
    pred, true = np.asarray(pred_order), np.asarray(true_order)
    if pred.shape != true.shape:
        raise ValueError(f"orders {pred.shape} and {true.shape} differ in shape")
    pred, true = pred.reshape(-1, pred.shape[-1]), true.reshape(-1, true.shape[-1])
    pos_p, pos_t = np.argsort(pred, -1), np.argsort(true, -1)  # position of each id
    i, j = np.triu_indices(pred.shape[-1], 1)
    agree = (pos_p[:, i] < pos_p[:, j]) == (pos_t[:, i] < pos_t[:, j])
    return float(agree.mean())


def visible_regions(regions) -> np.ndarray:
    """(..., K, H, W) boolean regions listed bottom to top -> the part of each no later
    region covers (what a correct occlusion order shows of it)."""
    r = np.asarray(regions, bool)
    above = np.flip(np.cumsum(np.flip(r, -3), -3), -3) - r  # regions above each one
    return r & (above == 0)


def region_adherence(assigned, regions) -> float:
    """Mean over (image, instance) of the fraction of the pixels ``assigned`` (..., H, W;
    instance ids, -1 = none) to instance ``k`` that lie in its region ``regions[..., k]``
    (..., K, H, W); an instance with no pixel counts 0 (it is missing)."""
    a, r = np.asarray(assigned), np.asarray(regions, bool)
    own = a[..., None, :, :] == np.arange(r.shape[-3]).reshape((-1, 1, 1))
    total = own.sum((-1, -2))
    inside = (own & r).sum((-1, -2))
    return float(np.mean(np.where(total > 0, inside / np.maximum(total, 1), 0.0)))


def occlusion_order_accuracy(assigned, regions) -> float:
    """Fraction of overlapping region pairs (over images) where the upper region's instance
    shows more pixels than the lower one's in their overlap; ``regions`` (..., K, H, W) are
    listed bottom to top, ``assigned`` as in :func:`region_adherence`. Ties (e.g. neither
    instance visible there) count as wrong. NaN without overlapping pairs."""
    a, r = np.asarray(assigned), np.asarray(regions, bool)
    a, r = a.reshape(-1, *a.shape[-2:]), r.reshape(-1, *r.shape[-3:])
    right = []
    for img, regs in zip(a, r):
        for i in range(len(regs)):
            for j in range(i + 1, len(regs)):
                overlap = regs[i] & regs[j]
                if overlap.any():
                    right.append((img[overlap] == j).sum() > (img[overlap] == i).sum())
    return float(np.mean(right)) if right else float("nan")


def layer_coherence(background, foreground, image, low: float = 0.05,
                    high: float = 0.95) -> dict:
    """How well a generated composite agrees with its generated layers: ``recomposition``
    (MSE of the image vs the foreground over the background), ``outside`` (MSE vs the
    background where alpha < ``low``) and ``inside`` (MSE vs the foreground's colour where
    alpha > ``high``); NaN where no pixel qualifies."""
    bg, fg, img = _f64(background, foreground, image)
    a = fg[..., 3]

    def masked(x, y, m):
        return float(((x - y) ** 2)[m].mean()) if m.any() else float("nan")

    return {"recomposition": recomposition_error(bg, fg[..., None, :, :, :], img),
            "outside": masked(img, bg, a < low), "inside": masked(img, fg[..., :3], a > high)}
