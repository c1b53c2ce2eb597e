"""Pre-flight checks: every view a pipeline writes exists on the server with its schema and TTL,
keyed by an entity whose single INT64 join key is the pipeline's entity column."""

from __future__ import annotations

from dataclasses import replace

import grpc

from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.errors import ConflictError, NotFoundError, UnavailableError
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from pipelines.config import Pipeline, Window
from pipelines.sink import AUTH_CODES, AUTH_FIX, connection


def expected_view(pipeline: Pipeline, window: Window, entity: str) -> FeatureView:
    """The feature view a window writes: one feature per aggregate, keyed by the entity, with
    the window's TTL (Pipeline.ttl_seconds)."""
    features = tuple(Feature(a.name, a.dtype) for a in window.aggregates)
    ttl = pipeline.ttl_seconds(window)
    return FeatureView(name=window.view, entity=entity, features=features, ttl_seconds=ttl)


def expected_entity(pipeline: Pipeline, name: str) -> Entity:
    """An entity whose single INT64 join key is the pipeline's entity column."""
    return Entity(name, (JoinKey(pipeline.entity_column, DType.INT64),))


def schema_problems(
    pipeline: Pipeline, window: Window, view: FeatureView, entity: Entity | None
) -> list[str]:
    """What keeps the registered view from taking the window's writes, one phrase each."""
    problems = []
    col = pipeline.entity_column
    if entity is None:
        problems.append(f"has entity {view.entity!r}, which is not registered; register it")
    else:
        keys = entity.join_keys
        if len(keys) != 1 or keys[0].name != col or DType(keys[0].dtype) is not DType.INT64:
            found = ", ".join(f"{k.name} {DType(k.dtype).name}" for k in keys)
            problems.append(
                f"has entity {entity.name!r} with join keys [{found}], but the pipeline writes "
                f"one INT64 key {col!r}; key the view by an entity whose only join key is "
                f"{col!r} INT64 (or set entity_column to the join key's name)"
            )
    features = {f.name: DType(f.dtype) for f in view.features}
    for agg in window.aggregates:
        if agg.name not in features:
            problems.append(
                f"lacks feature {agg.name} ({agg.dtype.name}) the pipeline writes; add it to "
                f"the view"
            )
        elif features[agg.name] is not agg.dtype:
            problems.append(
                f"has feature {agg.name} as {features[agg.name].name}, but the pipeline writes "
                f"{agg.dtype.name}; make it {agg.dtype.name} in the view"
            )
    written = {a.name for a in window.aggregates}
    problems += [
        f"has feature {name} the pipeline does not write; remove it or add it to "
        f"[pipeline.window.features]"
        for name in features
        if name not in written
    ]
    ttl = pipeline.ttl_seconds(window)
    if view.ttl_seconds != ttl:
        span = "size" if window.kind == "tumble" else "slide"
        source = "its ttl_s" if window.ttl_s is not None else f"{span} + watermark delay + 10 s"
        problems.append(
            f"has ttl_seconds = {view.ttl_seconds}, but the window's TTL is {ttl} s ({source}; "
            f"Flink writes no empty window, so only the TTL stops a quiet entity's last window "
            f"being served as current); apply the view with ttl_seconds = {ttl}, or set "
            f"ttl_s = {view.ttl_seconds} in the pipeline's window"
        )
    return problems


def check_views(target: str | ClientConfig, pipelines: list[Pipeline]) -> None:
    """Raise NotFoundError / ConflictError naming the view and the fix when a view does not fit;
    target is HOST:PORT or a ClientConfig (for TLS and a token)."""
    problems = []
    config = replace(connection(target), max_attempts=2)
    target = config.target
    with FeatureStoreClient(config) as client:
        for pipeline in pipelines:
            for window in pipeline.windows:
                try:
                    view = client.get_feature_view(window.view)
                    entities = {e.name: e for e in client.list_feature_views(window.view)[0]}
                except ClientError as exc:
                    if exc.code == grpc.StatusCode.NOT_FOUND:
                        raise NotFoundError(
                            f"pipeline {pipeline.name}: view {window.view!r} is not registered "
                            f"on {target}; register it first (featureserve apply features.toml)"
                        ) from None
                    fix = (
                        AUTH_FIX
                        if exc.code in AUTH_CODES
                        else "is the server running and reachable?"
                    )
                    raise UnavailableError(
                        f"pipeline {pipeline.name}: cannot read view {window.view!r} "
                        f"from {target}: {exc}; {fix}"
                    ) from None
                found = schema_problems(pipeline, window, view, entities.get(view.entity))
                problems += [f"view {window.view} {p}" for p in found]
    if problems:
        raise ConflictError(
            f"the views on {target} do not match the pipeline definitions: "
            + "; ".join(problems)
            + " (then apply the definitions, as a new view version if needed)"
        )


def apply_views(target: str | ClientConfig, pipelines: list[Pipeline], entity: str) -> None:
    """Register `entity` and every view the pipelines write (for demos, tests and benchmarks)."""
    with FeatureStoreClient(connection(target)) as client:
        for pipeline in pipelines:
            views = [expected_view(pipeline, w, entity) for w in pipeline.windows]
            client.apply([expected_entity(pipeline, entity)], views)
