"""Pre-flight checks: every view a pipeline writes exists on the server with its schema."""

from __future__ import annotations

import grpc

from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.errors import ConflictError, NotFoundError, UnavailableError
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from pipelines.config import Pipeline, Window


def expected_view(pipeline: Pipeline, window: Window, entity: str) -> FeatureView:
    """The feature view a window writes: one feature per aggregate, keyed by the entity."""
    features = tuple(Feature(a.name, a.dtype) for a in window.aggregates)
    return FeatureView(name=window.view, entity=entity, features=features)


def expected_entity(pipeline: Pipeline, name: str) -> Entity:
    """An entity whose single INT64 join key is the pipeline's entity column."""
    return Entity(name, (JoinKey(pipeline.entity_column, DType.INT64),))


def schema_problems(pipeline: Pipeline, window: Window, view: FeatureView) -> list[str]:
    """Differences between what the window writes and the registered view, one line each."""
    problems = []
    for agg in window.aggregates:
        match = [f for f in view.features if f.name == agg.name]
        if not match:
            problems.append(f"feature {agg.name!r} ({agg.dtype.name}) is missing from the view")
        elif DType(match[0].dtype) is not agg.dtype:
            problems.append(
                f"feature {agg.name!r} is {DType(match[0].dtype).name} on the server, "
                f"the pipeline writes {agg.dtype.name}"
            )
    return problems


def check_views(target: str, pipelines: list[Pipeline]) -> None:
    """Raise NotFoundError / ConflictError naming the view and the fix when a view does not fit."""
    problems = []
    with FeatureStoreClient(ClientConfig(target=target, max_attempts=2, timeout_s=10.0)) as client:
        for pipeline in pipelines:
            for window in pipeline.windows:
                try:
                    view = client.get_feature_view(window.view)
                except ClientError as exc:
                    if exc.code == grpc.StatusCode.NOT_FOUND:
                        raise NotFoundError(
                            f"pipeline {pipeline.name}: view {window.view!r} is not registered "
                            f"on {target}; register it first (featureserve apply features.toml)"
                        ) from None
                    raise UnavailableError(
                        f"pipeline {pipeline.name}: cannot read view {window.view!r} "
                        f"from {target}: {exc}"
                    ) from None
                problems += [
                    f"view {window.view!r}: {p}" for p in schema_problems(pipeline, window, view)
                ]
    if problems:
        raise ConflictError(
            f"the views on {target} do not match the pipeline definitions: "
            + "; ".join(problems)
            + "; add the features to the view (or a new view version) and apply it"
        )


def apply_views(target: str, pipelines: list[Pipeline], entity: str) -> None:
    """Register `entity` and every view the pipelines write (for demos, tests and benchmarks)."""
    with FeatureStoreClient(ClientConfig(target=target)) as client:
        for pipeline in pipelines:
            views = [expected_view(pipeline, w, entity) for w in pipeline.windows]
            client.apply([expected_entity(pipeline, entity)], views)
