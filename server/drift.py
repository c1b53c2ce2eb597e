"""Feature drift: a reference histogram per feature (fitted on the first ingested values, or
supplied) and the featureserve_feature_psi gauge, updated from the blocks of live values the
caller samples."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from featurestore.kernels.drift import histogram, psi
from server.metrics import FEATURE_PSI, forget

PSI_EPS = 1e-4


@dataclass(frozen=True)
class ReferenceProfile:
    """Bin edges (ascending) and the reference counts per bucket, laid out as the drift kernel
    counts them: below edges[0], one bucket per edge interval, at or above edges[-1], NaN."""

    edges: np.ndarray
    counts: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, bins: int = 10) -> ReferenceProfile:
        """Quantile edges of `values` (duplicates merged, so constant features get one edge) and
        their counts."""
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            edges = np.zeros(1)
        else:
            edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
        return cls(edges, histogram(values, edges).astype(np.float64))

    @classmethod
    def from_proportions(cls, edges: np.ndarray, proportions: np.ndarray) -> ReferenceProfile:
        """A supplied profile: len(edges) + 2 proportions in the kernel's bucket layout."""
        edges = np.asarray(edges, dtype=np.float64)
        proportions = np.asarray(proportions, dtype=np.float64)
        if edges.ndim != 1 or edges.size == 0 or np.any(np.diff(edges) <= 0):
            raise ValueError("edges: need a non-empty, strictly ascending 1-D array")
        if proportions.shape != (edges.size + 2,):
            raise ValueError(
                f"proportions: need {edges.size + 2} values (below, {edges.size - 1} inner "
                f"buckets, at or above the last edge, NaN), got {proportions.size}"
            )
        return cls(edges, proportions)


class FeatureDrift:
    """Drift state of one feature: the reference (or the values gathered to fit it) and the
    exponentially decayed live counts whose PSI the gauge shows."""

    def __init__(self, view: str, feature: str, fit_rows: int, decay: float) -> None:
        self.gauge = FEATURE_PSI.labels(view, feature)
        self.fit_rows = fit_rows
        self.decay = decay
        self.reference: ReferenceProfile | None = None
        self.live: np.ndarray | None = None
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def set_reference(self, profile: ReferenceProfile) -> None:
        """Use a supplied profile and restart the live window."""
        self.reference = profile
        self.live = np.zeros_like(profile.counts)
        self._pending = []

    def update(self, values: np.ndarray) -> float | None:
        """Fold a sample into the fit buffer or the live counts; returns the new PSI, if any."""
        if self.reference is None:
            self._pending.append(values)
            self._pending_rows += values.size
            if self._pending_rows >= self.fit_rows:
                self.set_reference(ReferenceProfile.fit(np.concatenate(self._pending)))
            return None
        self.live *= self.decay
        self.live += histogram(values, self.reference.edges)
        value = psi(self.reference.counts, self.live, PSI_EPS)
        self.gauge.set(value)
        return value


class DriftMonitor:
    """Drift of one feature view's numeric features, from the blocks of values (lookup results
    or writes) its caller chooses to offer, at most `max_rows` rows of each."""

    def __init__(
        self,
        view: str,
        max_rows: int = 1024,
        fit_rows: int = 10_000,
        decay: float = 0.95,
    ) -> None:
        self.view = view
        self.max_rows = max_rows
        self.fit_rows = fit_rows
        self.decay = decay
        self.features: dict[str, FeatureDrift] = {}

    def feature(self, name: str) -> FeatureDrift:
        """The drift state of one feature, created on first use."""
        state = self.features.get(name)
        if state is None:
            state = self.features[name] = FeatureDrift(self.view, name, self.fit_rows, self.decay)
        return state

    def drop(self, names: Iterable[str]) -> None:
        """Forget the drift of these features and their gauges (features of a deleted view
        or version): one of them seen again starts a new reference."""
        for name in names:
            if self.features.pop(name, None) is not None:
                forget(FEATURE_PSI, self.view, name)

    def observe(self, columns: Mapping[str, np.ndarray]) -> None:
        """Fold a block of columns (feature name -> 1-D values) into each feature's drift.
        Non-numeric and vector features are skipped."""
        for name, values in columns.items():
            if values.ndim == 1 and values.dtype.kind in "fiub":
                sample = values[: self.max_rows].astype(np.float64, copy=False)
                self.feature(name).update(sample)
