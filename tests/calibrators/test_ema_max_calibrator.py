"""ema_max: follows the bias-corrected EMA recurrence of per-batch min/max (Jacob et al. §3.1)."""
from __future__ import annotations

import numpy as np
import pytest

from qcompile.calibration import make_calibrator
from qcompile.qtypes import QuantSpec
import qcompile.calibrators  # noqa: F401  (registers the calibrators)


def batches(seed=0, count=7):
    rng = np.random.default_rng(seed)
    return [rng.normal(rng.uniform(-1, 1), rng.uniform(0.5, 3), (4, 3, 5, 5)).astype(np.float32)
            for _ in range(count)]


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99])
def test_follows_the_recurrence_asymmetric(decay):
    data = batches()
    calibrator = make_calibrator(QuantSpec(symmetric=False, calibrator="ema_max",
                                           calibrator_options={"decay": decay}))
    a = b = 0.0
    for t, x in enumerate(data, start=1):
        calibrator.observe(x)
        a = decay * a + (1 - decay) * float(x.min())
        b = decay * b + (1 - decay) * float(x.max())
        r = calibrator.compute_range()
        assert float(r.lo) == pytest.approx(a / (1 - decay**t), rel=1e-12)
        assert float(r.hi) == pytest.approx(b / (1 - decay**t), rel=1e-12)


def test_first_batch_gives_its_own_range_and_default_decay():
    x = batches()[0]
    calibrator = make_calibrator(QuantSpec(symmetric=False, calibrator="ema_max"))
    assert calibrator.options.decay == 0.99
    calibrator.observe(x)
    r = calibrator.compute_range()
    assert float(r.lo) == pytest.approx(float(x.min()), rel=1e-12)
    assert float(r.hi) == pytest.approx(float(x.max()), rel=1e-12)


def test_symmetric_and_unsigned_shapes():
    data = batches(1)
    decay = 0.9
    a = b = 0.0
    for x in data:
        a = decay * a + (1 - decay) * float(x.min())
        b = decay * b + (1 - decay) * float(x.max())
    correction = 1 - decay ** len(data)
    for signed, expected_lo in ((True, -max(-a, b) / correction), (False, 0.0)):
        calibrator = make_calibrator(QuantSpec(signed=signed, calibrator="ema_max",
                                               calibrator_options={"decay": decay}))
        for x in data:
            calibrator.observe(x)
        r = calibrator.compute_range()
        assert float(r.lo) == pytest.approx(expected_lo, rel=1e-12)
        assert float(r.hi) == pytest.approx((max(-a, b) if signed else b) / correction, rel=1e-12)


def test_per_channel():
    data = batches(2)
    decay = 0.8
    calibrator = make_calibrator(QuantSpec(symmetric=False, axis=1, calibrator="ema_max",
                                           calibrator_options={"decay": decay}))
    a = np.zeros(3)
    b = np.zeros(3)
    for x in data:
        calibrator.observe(x)
        a = decay * a + (1 - decay) * x.min(axis=(0, 2, 3)).astype(np.float64)
        b = decay * b + (1 - decay) * x.max(axis=(0, 2, 3)).astype(np.float64)
    r = calibrator.compute_range()
    np.testing.assert_allclose(r.lo, a / (1 - decay ** len(data)), rtol=1e-12)
    np.testing.assert_allclose(r.hi, b / (1 - decay ** len(data)), rtol=1e-12)


def test_decay_is_validated():
    with pytest.raises(Exception):
        make_calibrator(QuantSpec(calibrator="ema_max", calibrator_options={"decay": 1.0}))
