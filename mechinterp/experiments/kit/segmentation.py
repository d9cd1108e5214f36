"""Segmentation scores: per-class IoU accumulated over a whole set, and their mean.

``IoU_c = |pred = c and target = c| / |pred = c or target = c|`` with both counts summed
over every pixel of every image; mIoU averages the classes whose union is non-empty (a
class absent from both prediction and target does not count), as Cityscapes' evaluation.
"""

from __future__ import annotations

import numpy as np


def confusion(pred, target, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` pixel counts, rows = target class, columns = predicted."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target need the same number of pixels, got {pred.size} "
                         f"and {target.size}")
    return np.bincount(target * n_classes + pred, minlength=n_classes ** 2).reshape(
        n_classes, n_classes)


def class_iou(pred, target, n_classes: int) -> np.ndarray:
    """IoU per class (NaN where a class is in neither prediction nor target)."""
    m = confusion(pred, target, n_classes).astype(np.float64)
    inter = np.diag(m)
    union = m.sum(0) + m.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def mean_iou(pred, target, n_classes: int) -> float:
    """mIoU over the classes present in prediction or target (module docstring)."""
    return float(np.nanmean(class_iou(pred, target, n_classes)))
