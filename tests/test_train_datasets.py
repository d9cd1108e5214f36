"""The scikit-learn digits and statsmodels time-series tfds builders."""

import numpy as np
import pytest
import statsmodels.api as sm
from mechinterp.train.digits import build_digits, rotate_image, split_indices
from mechinterp.train.timeseries import build_timeseries, load_series, normalization
from sklearn.datasets import load_digits

DIGITS = load_digits()
SEEN = (0, 1, 2, 3, 4, 5, 6)
ANGLES = (0.0, 90.0, 30.0)


def _records(builder, split):
    source = builder.as_data_source(split)
    return source.__getitems__(range(len(source)))


def _by_key(records, *keys):
    return {tuple(int(r[k]) for k in keys): r for r in records}


def test_rotation_by_90_degrees_is_exact_and_counterclockwise():
    image = np.random.default_rng(0).random((8, 8))
    turned = image
    for _ in range(4):
        turned = rotate_image(turned, 90)
    np.testing.assert_array_equal(turned, image)  # four quarter turns: the original
    corner = np.zeros((8, 8))
    corner[0, 7] = 1.0  # top right -> top left, counterclockwise as displayed
    assert rotate_image(corner, 90)[0, 0] == 1.0 and rotate_image(corner, 90).sum() == 1.0
    np.testing.assert_array_equal(rotate_image(image, -90), rotate_image(image, 270))
    np.testing.assert_array_equal(rotate_image(image, 450), rotate_image(image, 90))
    # The interpolated path turns the same way: just short of 90 degrees it matches rot90.
    np.testing.assert_allclose(rotate_image(image, 90 - 1e-7), np.rot90(image), atol=1e-6)
    half = rotate_image(DIGITS.images[0] / 16, 45)
    assert half.shape == (8, 8) and 0 <= half.min() and half.max() <= 1  # no overshoot


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("digits")
    return build_digits(data_dir=data_dir, classes=SEEN, angles=ANGLES, seed=3), data_dir


def test_digits_counts_class_splits_and_rotated_copies(digits):
    builder, _ = digits
    splits = {s: _records(builder, s) for s in ("train", "test", "heldout")}
    per_class = np.bincount(DIGITS.target)
    n_test = {c: round(0.25 * per_class[c]) for c in range(10)}
    assert len(splits["train"]) == len(ANGLES) * sum(per_class[c] - n_test[c] for c in SEEN)
    assert len(splits["test"]) == len(ANGLES) * sum(n_test[c] for c in SEEN)
    assert len(splits["heldout"]) == len(ANGLES) * sum(per_class[c] for c in (7, 8, 9))

    rows = {s: {int(r["index"]) for r in records} for s, records in splits.items()}
    assert not rows["train"] & rows["test"] and not (rows["train"] | rows["test"]) & rows[
        "heldout"]
    assert rows["train"] | rows["test"] | rows["heldout"] == set(range(len(DIGITS.target)))
    assert {int(r["label"]) for r in splits["train"] + splits["test"]} == set(SEEN)
    assert {int(r["label"]) for r in splits["heldout"]} == {7, 8, 9}

    copies = _by_key(splits["test"], "index", "angle")
    for row in sorted(rows["test"])[:20]:
        original = DIGITS.images[row] / 16
        assert int(copies[row, 0]["label"]) == DIGITS.target[row]
        np.testing.assert_array_equal(copies[row, 0]["inputs"].reshape(8, 8),
                                      original.astype(np.float32))
        np.testing.assert_array_equal(copies[row, 90]["inputs"].reshape(8, 8),
                                      np.rot90(original).astype(np.float32))
        np.testing.assert_allclose(copies[row, 30]["inputs"].reshape(8, 8),
                                   rotate_image(original, 30), atol=1e-6)


def test_digits_are_deterministic_given_the_seed(digits, tmp_path):
    builder, data_dir = digits
    assert build_digits(data_dir=data_dir, classes=SEEN, angles=ANGLES,
                        seed=3).data_dir == builder.data_dir  # prepared once, reused

    def build(folder, seed):
        return build_digits(data_dir=tmp_path / folder, classes=(0, 1), angles=(0, 45),
                            seed=seed)

    first, again = build("a", 5), build("b", 5)
    for split in ("train", "test", "heldout"):
        a, b = (_by_key(_records(x, split), "index", "angle") for x in (first, again))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key]["inputs"], b[key]["inputs"])
    test_rows = {int(r["index"]) for r in _records(first, "test")}
    assert test_rows == set(split_indices(DIGITS.target, 0.25, seed=5)[1]) & set(
        np.flatnonzero(DIGITS.target < 2))
    assert set(split_indices(DIGITS.target, 0.25, seed=6)[1]) != set(
        split_indices(DIGITS.target, 0.25, seed=5)[1])


def test_digits_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"classes must be distinct digits 0..9"):
        build_digits(data_dir=tmp_path, classes=(3, 10))
    with pytest.raises(ValueError, match=r"angles \(0, 90, 0\) repeat"):
        build_digits(data_dir=tmp_path, angles=(0, 90, 0))
    with pytest.raises(ValueError, match="test_fraction must be in"):
        build_digits(data_dir=tmp_path, test_fraction=1.0)


@pytest.fixture(scope="module")
def sunspots(tmp_path_factory):
    return build_timeseries("sunspots", data_dir=tmp_path_factory.mktemp("series"),
                            context=16, horizon=4, test_fraction=0.2)


def test_sunspot_windows_match_the_raw_series(sunspots):
    raw = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    assert len(raw) == 309
    split = 247  # 309 - round(0.2 * 309)
    assert sunspots.info.metadata["split"] == split
    mean, std = normalization(sunspots)
    np.testing.assert_allclose(mean, [raw[:split].mean()], rtol=1e-12)
    np.testing.assert_allclose(std, [raw[:split].std()], rtol=1e-12)

    train, test = _records(sunspots, "train"), _records(sunspots, "test")
    # train: starts 0..227 (window of 20 ending by step 247); test: targets start at
    # 247..305 (the last ends at step 309), contexts reaching back into the train period.
    assert sorted(int(r["start"]) for r in train) == list(range(228))
    assert sorted(int(r["start"]) for r in test) == list(range(split - 16, 309 - 20 + 1))
    for r in train + test:
        s = int(r["start"])
        np.testing.assert_allclose(r["context"][:, 0] * std[0] + mean[0], raw[s:s + 16],
                                   rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(r["target"][:, 0] * std[0] + mean[0], raw[s + 16:s + 20],
                                   rtol=1e-6, atol=1e-4)
    train_values = np.concatenate([np.r_[r["context"][:, 0], r["target"][:, 0]] for r in train])
    assert abs(train_values.mean()) < 0.1 and abs(test[0]["target"]).max() < 10


def test_multicolumn_series_with_stride_and_gaps(tmp_path):
    frame = sm.datasets.macrodata.load_pandas().data
    builder = build_timeseries("macrodata", columns=["infl", "realgdp"], data_dir=tmp_path,
                               context=8, horizon=2, stride=3, test_fraction=0.25)
    split = 203 - 51  # round(0.25 * 203) = 51
    raw = frame[["infl", "realgdp"]].to_numpy()
    mean, std = normalization(builder)
    np.testing.assert_allclose(mean, raw[:split].mean(0), rtol=1e-12)
    assert builder.info.metadata["columns"] == ["infl", "realgdp"]
    train = _records(builder, "train")
    assert sorted(int(r["start"]) for r in train) == list(range(0, split - 10 + 1, 3))
    for r in train[:10]:
        s = int(r["start"])
        np.testing.assert_allclose(r["context"] * std + mean, raw[s:s + 8], rtol=1e-5)
    assert sorted(int(r["start"]) for r in _records(builder, "test")) == list(
        range(split - 8, 203 - 10 + 1, 3))

    co2 = sm.datasets.co2.load_pandas().data["co2"].to_numpy()
    filled, columns = load_series("co2")
    assert columns == ("co2",) and np.isnan(co2[6]) and not np.isnan(co2[[5, 7]]).any()
    assert filled[6, 0] == pytest.approx((co2[5] + co2[7]) / 2)  # linear interpolation
    assert not np.isnan(filled).any()


def test_timeseries_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown series 'sunspot'; choose one of"):
        build_timeseries("sunspot", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"has no columns \['gdp'\]; its columns are"):
        build_timeseries("macrodata", columns=["gdp"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="no room for a train window of 90 steps"):
        build_timeseries("nile", context=80, horizon=10, data_dir=tmp_path)
    with pytest.raises(ValueError, match="context, horizon and stride must be >= 1"):
        build_timeseries("nile", stride=0, data_dir=tmp_path)
