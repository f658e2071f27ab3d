"""merge(): statistics of two shards give the same range as one pass over all batches."""
from __future__ import annotations

import numpy as np
import pytest

import qcompile.registry as registry
from qcompile.calibration import Calibrator, make_calibrator
from qcompile.errors import CalibrationError
from qcompile.qtypes import QuantSpec

registry.load_builtins_and_entry_points()
ALL = ["max", "ema_max", "percentile", "entropy", "mse", "aciq"]
PER_CHANNEL = ["max", "ema_max", "percentile", "mse", "aciq"]


def test_all_six_are_registered():
    assert set(ALL) <= set(registry.CALIBRATORS.names())


def shards(seed: int, shape=(2, 4, 6, 6)):
    """Shard A: small values; shard B: widens the range 50x on one side and adds zeros."""
    rng = np.random.default_rng(seed)
    a = [rng.normal(0.1, 0.2, shape).astype(np.float32) for _ in range(3)]
    b = [np.maximum(rng.laplace(0.0, 10.0, shape), -0.5).astype(np.float32) for _ in range(4)]
    return a, b


def run(spec: QuantSpec, batches) -> Calibrator:
    calibrator = make_calibrator(spec)
    for x in batches:
        calibrator.observe(x)
    return calibrator


def assert_same_range(left, right, exact: bool):
    check = np.testing.assert_array_equal if exact else (
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12))
    check(np.asarray(left.lo), np.asarray(right.lo))
    check(np.asarray(left.hi), np.asarray(right.hi))


SPECS = [dict(), dict(symmetric=False, signed=False), dict(signed=False), dict(bits=4)]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("spec_fields", SPECS, ids=["sym", "asym", "unsigned", "4bit"])
def test_merged_shards_equal_one_pass(name, spec_fields):
    spec = QuantSpec(calibrator=name, **spec_fields)
    a, b = shards(0)
    one_pass = run(spec, a + b).compute_range()
    merged = run(spec, a)
    merged.merge(run(spec, b))
    # max and histogram counts are exact; moments and EMA are float sums in another order
    assert_same_range(merged.compute_range(), one_pass, exact=name in ("max", "percentile", "entropy", "mse"))
    if name != "ema_max":  # every other statistic is order-free: B then A gives the same
        reverse = run(spec, b)
        reverse.merge(run(spec, a))
        assert_same_range(reverse.compute_range(), one_pass, exact=name != "aciq")


@pytest.mark.parametrize("name", PER_CHANNEL)
def test_merged_shards_equal_one_pass_per_channel(name):
    spec = QuantSpec(calibrator=name, axis=1)
    a, b = shards(1)
    one_pass = run(spec, a + b).compute_range()
    merged = run(spec, a)
    merged.merge(run(spec, b))
    assert np.shape(one_pass.hi) == (4,)
    assert_same_range(merged.compute_range(), one_pass, exact=name not in ("ema_max", "aciq"))


@pytest.mark.parametrize("name", ALL)
def test_merge_with_an_empty_shard_and_into_an_empty_one(name):
    spec = QuantSpec(calibrator=name)
    a, _ = shards(2)
    expected = run(spec, a).compute_range()
    left = run(spec, a)
    left.merge(make_calibrator(spec))
    assert_same_range(left.compute_range(), expected, exact=True)
    right = make_calibrator(spec)
    right.merge(run(spec, a))
    assert_same_range(right.compute_range(), expected, exact=name != "ema_max")


def test_histogram_counts_of_merged_shards_are_identical():
    spec = QuantSpec(calibrator="percentile")
    a, b = shards(3)
    one_pass = run(spec, a + b).histogram()
    merged = run(spec, a)
    merged.merge(run(spec, b))
    h = merged.histogram()
    assert h.width == one_pass.width
    np.testing.assert_array_equal(h.positive, one_pass.positive)
    np.testing.assert_array_equal(h.negative, one_pass.negative)


def test_merge_refuses_other_kinds_and_specs():
    a = make_calibrator(QuantSpec(calibrator="percentile"))
    with pytest.raises(CalibrationError):
        a.merge(make_calibrator(QuantSpec(calibrator="mse")))
    with pytest.raises(CalibrationError):
        a.merge(make_calibrator(QuantSpec(calibrator="percentile", bits=4)))
    with pytest.raises(CalibrationError):
        a.merge(make_calibrator(QuantSpec(calibrator="percentile", calibrator_options={"percentile": 99})))
    with pytest.raises(CalibrationError):
        make_calibrator(QuantSpec(calibrator="max")).merge(make_calibrator(QuantSpec(calibrator="ema_max")))


def test_base_class_merge_is_not_implemented():
    class Counting(Calibrator):
        def observe(self, x):
            self.samples += 1

        def compute_range(self):
            raise NotImplementedError

    with pytest.raises(NotImplementedError, match="cannot merge"):
        Counting(QuantSpec()).merge(Counting(QuantSpec()))
