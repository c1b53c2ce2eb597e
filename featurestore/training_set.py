"""Training sets: several feature views joined point-in-time onto one table of labelled entity
rows (Feast's get_historical_features), from the views' history logs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurestore.errors import InvalidArgumentError
from featurestore.feature_refs import parse_feature_refs, written_view_parts
from featurestore.history import point_in_time

if TYPE_CHECKING:
    from featurestore.online_store import OnlineStore


@dataclass
class TrainingSet:
    """Columns for the labelled rows, in their order. values and statuses are keyed by feature
    reference as the caller wrote its view part ("spend:amount", "spend@2:amount"); event_us
    (µs, 0 where no row was used) by that view part."""

    values: dict[str, np.ndarray]
    statuses: dict[str, np.ndarray]
    event_us: dict[str, np.ndarray]


def training_set(
    store: OnlineStore,
    entity_rows: Mapping[str, np.ndarray],
    timestamps: object,
    features: Sequence[str],
    *,
    as_served: bool = False,
) -> TrainingSet:
    """For each labelled row (its join key columns in entity_rows, its label time in
    timestamps, int64 µs), the value of every referenced feature a training example sees then:
    point_in_time of each referenced view (version), by event time or as served, each joined
    on the join keys of its own entity. InvalidArgumentError naming a missing join key column
    or an empty feature list; NotFoundError naming an unknown view or feature."""
    if isinstance(features, str) or not features:
        raise InvalidArgumentError(
            f"features: got {features!r}; give a list of references, e.g. ['spend:amount']"
        )
    refs = list(features)
    found = TrainingSet({}, {}, {})
    for ((name, version), wanted), written in zip(
        parse_feature_refs(refs).items(), written_view_parts(refs), strict=True
    ):
        fv = store.registry.get_view(name, version)
        entity = store.registry.get_entity(fv.entity)
        missing = [key.name for key in entity.join_keys if key.name not in entity_rows]
        if missing:
            raise InvalidArgumentError(
                f"entity_rows: no column {missing[0]!r}, a join key of entity {entity.name!r} "
                f"that view {written[0]!r} is keyed by; add it to the labelled rows"
            )
        keys = {key.name: entity_rows[key.name] for key in entity.join_keys}
        got = point_in_time(store, name, keys, timestamps, wanted, version, as_served=as_served)
        for part in written:
            found.event_us[part] = got.event_us
            for block in got.blocks:
                for j, feature in enumerate(block.features):
                    found.values[f"{part}:{feature}"] = block.values[:, j]
                    found.statuses[f"{part}:{feature}"] = block.statuses[:, j]
    order = _column_order(store, refs, found.values)
    return TrainingSet(
        {ref: found.values[ref] for ref in order},
        {ref: found.statuses[ref] for ref in order},
        found.event_us,
    )


def _column_order(store: OnlineStore, refs: list[str], columns: Mapping[str, object]) -> list[str]:
    """The feature columns in the order the references name them, a whole view's features in
    the view's order."""
    order: dict[str, None] = {}
    for ref in refs:
        if ref in columns:
            order[ref] = None
            continue
        name, _, version = ref.partition("@")
        view = store.registry.get_view(name, int(version or 0))
        order.update((f"{ref}:{f.name}", None) for f in view.features)
    return list(order)
