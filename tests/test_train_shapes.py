"""The procedural shapes tfds builder: deterministic images, labels in class order, and task
pairs that share every primitive (near) or none (far)."""

import numpy as np
import pytest
from mechinterp.train.shapes import CLASSES, build_shapes, render, task_pair


def _arrays(builder, split):
    source = builder.as_data_source(split)
    records = source.__getitems__(range(len(source)))
    return (np.stack([r["inputs"] for r in records]), np.array([r["label"] for r in records]),
            np.array([r["class_id"] for r in records]))


def test_task_pairs_share_all_primitives_when_near_and_none_when_far():
    for seed in range(3):
        near_a, near_b = task_pair("near", seed)
        assert len(set(near_a) | set(near_b)) == 10  # disjoint classes
        for axis in range(3):  # same shapes, textures and palette in both tasks
            assert {CLASSES[k][axis] for k in near_a} == {CLASSES[k][axis] for k in near_b}
        far_a, far_b = task_pair("far", seed)
        for axis in range(3):  # no shape, texture or palette in common
            assert not {CLASSES[k][axis] for k in far_a} & {CLASSES[k][axis] for k in far_b}
    with pytest.raises(ValueError, match="'near' or 'far'"):
        task_pair("medium")


def test_builder_is_deterministic_and_labels_follow_class_order(tmp_path):
    classes = (7, 0, 30)
    builder = build_shapes(data_dir=tmp_path / "a", classes=classes, n_train=6, n_test=3)
    x, y, ids = _arrays(builder, "train")
    assert x.shape == (18, 8, 8, 3) and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(np.asarray(classes)[y], ids) and np.bincount(y).tolist() == [6] * 3
    again = build_shapes(data_dir=tmp_path / "b", classes=classes, n_train=6, n_test=3)
    x2, _, _ = _arrays(again, "train")
    assert sorted(map(bytes, x)) == sorted(map(bytes, x2))  # same images, any order
    test_x, _, _ = _arrays(builder, "test")
    assert not set(map(bytes, test_x)) & set(map(bytes, x))  # train and test differ


def test_classes_look_different_and_bad_settings_are_named(tmp_path):
    rng = np.random.default_rng(0)
    disk, ring = (np.mean([render(CLASSES.index((s, "solid", "warm")), 12, rng, 0.0)
                           for _ in range(50)], 0) for s in ("disk", "ring"))
    assert disk[6, 6].sum() > ring[6, 6].sum() + 0.5  # a ring's centre is background
    warm, cool = (render(CLASSES.index(("square", "solid", p)), 8, rng, 0.0)[4, 4]
                  for p in ("warm", "cool"))
    assert warm[0] > warm[2] and cool[2] > cool[0]  # red-ish vs blue-ish
    with pytest.raises(ValueError, match="distinct ids in 0..47"):
        build_shapes(data_dir=tmp_path, classes=(1, 1))
