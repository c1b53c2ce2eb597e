"""Drift: reference profiles fitted or supplied, PSI on the gauge near zero for the same
distribution and large for a shifted one, at most max_rows rows a block, non-numeric skipped."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from featurestore.kernels.drift import histogram
from server.drift import DriftMonitor, ReferenceProfile


def psi_gauge(view: str, feature: str) -> float | None:
    return REGISTRY.get_sample_value("featureserve_feature_psi", {"view": view, "feature": feature})


def test_fit_uses_quantile_edges_and_the_kernel_layout() -> None:
    values = np.random.default_rng(0).normal(size=10_000)
    profile = ReferenceProfile.fit(values, bins=10)
    assert profile.edges.shape == (9,)
    assert np.all(np.diff(profile.edges) > 0)
    assert profile.counts.sum() == values.size
    assert np.allclose(profile.counts[1:-2], 1000, atol=2)
    constant = ReferenceProfile.fit(np.full(100, 3.0))
    assert constant.edges.tolist() == [3.0]
    assert np.array_equal(constant.counts, histogram(np.full(100, 3.0), np.array([3.0])))


def test_supplied_profile_is_checked() -> None:
    profile = ReferenceProfile.from_proportions([0.0, 1.0], [0.1, 0.8, 0.1, 0.0])
    assert profile.counts.tolist() == [0.1, 0.8, 0.1, 0.0]
    with pytest.raises(ValueError, match="need 4 values"):
        ReferenceProfile.from_proportions([0.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="strictly ascending"):
        ReferenceProfile.from_proportions([1.0, 0.0], [0.1, 0.8, 0.1, 0.0])


def test_psi_gauge_tracks_live_traffic() -> None:
    rng = np.random.default_rng(1)
    monitor = DriftMonitor("drift_view", max_rows=512, fit_rows=4096)
    for block in range(8):
        assert block == 0 or monitor.features["amount"].reference is None
        monitor.observe(
            {
                "amount": rng.normal(size=1024),
                "name": np.array(["x"] * 1024, dtype=object),
                "embedding": rng.normal(size=(1024, 4)).astype(np.float32),
            }
        )
    assert set(monitor.features) == {"amount"}
    assert monitor.features["amount"].reference is not None
    for _ in range(64):
        monitor.observe({"amount": rng.normal(size=512)})
    stable = psi_gauge("drift_view", "amount")
    assert stable is not None and stable < 0.05
    for _ in range(256):
        monitor.observe({"amount": rng.normal(loc=1.5, size=512)})
    assert psi_gauge("drift_view", "amount") > 0.5


def test_supplied_reference_replaces_fitting() -> None:
    monitor = DriftMonitor("drift_supplied")
    edges = np.linspace(-2, 2, 9)
    reference = ReferenceProfile(edges, histogram(np.linspace(-3, 3, 10_000), edges).astype(float))
    monitor.feature("x").set_reference(reference)
    psi = monitor.features["x"].update(np.linspace(-3, 3, 1000))
    assert psi is not None and psi < 0.01
    assert psi_gauge("drift_supplied", "x") == psi


def test_dropped_features_lose_their_gauge_and_start_over() -> None:
    """drop() (a deleted view or version) removes the PSI series; the feature seen again is
    fitted afresh rather than compared with the old reference."""
    rng = np.random.default_rng(2)
    monitor = DriftMonitor("drift_dropped", fit_rows=1000)
    for _ in range(4):
        monitor.observe({"a": rng.normal(size=512), "b": rng.normal(size=512)})
    assert psi_gauge("drift_dropped", "a") is not None
    monitor.drop(["a", "never_seen"])
    assert psi_gauge("drift_dropped", "a") is None
    assert psi_gauge("drift_dropped", "b") is not None
    monitor.observe({"a": rng.normal(loc=5.0, size=512)})
    assert monitor.features["a"].reference is None
    assert psi_gauge("drift_dropped", "a") == 0
