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
from featurestore.registry import FeatureProjection, FeatureService

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
    features: Sequence[str] | None = None,
    *,
    feature_service: str | FeatureService | None = None,
    as_served: bool = False,
) -> TrainingSet:
    """For each labelled row (its join key columns in entity_rows, its label time in
    timestamps, int64 µs), the value of every referenced feature a training example sees then:
    point_in_time of each referenced view (version), by event time or as served, each joined
    on the join keys of its own entity. The features are the references listed, or those of a
    feature service as stored, keyed as a lookup by that service keys them (by_view_names), so
    a model trains on what serving sends it under the same names; its projections are joined
    on the columns their join_key_map names and keyed by alias (projected). InvalidArgumentError
    naming a missing join key column, an empty feature list, or both or neither of features and
    feature_service; NotFoundError naming an unknown feature service, view or feature."""
    refs, projections = training_inputs(store, features, feature_service)
    found = _by_refs(store, entity_rows, timestamps, refs, as_served)
    if feature_service is None:
        return found
    by_alias = projected(store, projections, entity_rows, timestamps, as_served=as_served)
    return merged(by_view_names(found), by_alias)


def _by_refs(
    store: OnlineStore,
    entity_rows: Mapping[str, np.ndarray],
    timestamps: object,
    refs: list[str],
    as_served: bool,
) -> TrainingSet:
    """training_set of the references `refs`, keyed by reference as written."""
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


def projected(
    store: OnlineStore,
    projections: Sequence[FeatureProjection],
    entity_rows: Mapping[str, np.ndarray],
    timestamps: object,
    *,
    as_served: bool = False,
) -> TrainingSet:
    """Each projection of a feature service joined point-in-time as training_set joins a
    reference, on the columns of entity_rows its join_key_map names (as a lookup by the service
    reads them from the request), keyed "alias:feature" and event times by alias.
    InvalidArgumentError naming a missing column and the projection."""
    found = TrainingSet({}, {}, {})
    for projection in projections:
        name, version = projection.view_key
        fv = store.registry.get_view(name, version)
        entity = store.registry.get_entity(fv.entity)
        columns = {key.name: projection.column(key.name) for key in entity.join_keys}
        missing = [column for column in columns.values() if column not in entity_rows]
        if missing:
            raise InvalidArgumentError(
                f"entity_rows: no column {missing[0]!r}, which feature service projection "
                f"{projection.alias!r} reads a join key of entity {entity.name!r} from (its "
                f"join_key_map: {columns}); add it to the labelled rows"
            )
        keys = {key: entity_rows[column] for key, column in columns.items()}
        wanted = list(projection.features) or [f.name for f in fv.features]
        got = point_in_time(store, name, keys, timestamps, wanted, version, as_served=as_served)
        by_feature = {
            feature: (block.values[:, j], block.statuses[:, j])
            for block in got.blocks
            for j, feature in enumerate(block.features)
        }
        found.event_us[projection.alias] = got.event_us
        for feature in wanted:
            values, statuses = by_feature[feature]
            found.values[f"{projection.alias}:{feature}"] = values
            found.statuses[f"{projection.alias}:{feature}"] = statuses
    return found


def merged(first: TrainingSet, second: TrainingSet) -> TrainingSet:
    """The columns of both, `first`'s first (their names do not overlap)."""
    return TrainingSet(
        {**first.values, **second.values},
        {**first.statuses, **second.statuses},
        {**first.event_us, **second.event_us},
    )


def unversioned(name: str) -> str:
    """A column or view name without the version its reference pinned: "spend@1:amount" ->
    "spend:amount", "spend@1" -> "spend"."""
    view_part, sep, feature = name.partition(":")
    return view_part.partition("@")[0] + sep + feature


def by_view_names(found: TrainingSet) -> TrainingSet:
    """The same columns keyed as a lookup by feature service keys them ("view:feature", event
    times by "view"), whatever version a reference pins: a service reads each view at one
    version, so no two names collide."""
    return TrainingSet(
        {unversioned(ref): values for ref, values in found.values.items()},
        {unversioned(ref): statuses for ref, statuses in found.statuses.items()},
        {unversioned(view): event_us for view, event_us in found.event_us.items()},
    )


def training_inputs(
    store: OnlineStore,
    features: Sequence[str] | None,
    feature_service: str | FeatureService | None,
) -> tuple[list[str], tuple[FeatureProjection, ...]]:
    """The references and projections to read: `features` as given (no projections), or those
    of the feature service stored under feature_service's name, read once (a FeatureService
    object's own definition is not used)."""
    if (features is None) == (feature_service is None):
        raise InvalidArgumentError(
            "features, feature_service: give exactly one: a list of references, e.g. "
            "['spend:amount'], or the name of a feature service"
        )
    if feature_service is None:
        if isinstance(features, str) or not features:
            raise InvalidArgumentError(
                f"features: got {features!r}; give a list of references, e.g. ['spend:amount']"
            )
        return list(features), ()
    name = feature_service.name if isinstance(feature_service, FeatureService) else feature_service
    if not isinstance(name, str):
        raise InvalidArgumentError(
            f"feature_service: got {name!r}; give a service name or a FeatureService"
        )
    service = store.registry.get_service(name)
    return list(service.features), service.projections


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
