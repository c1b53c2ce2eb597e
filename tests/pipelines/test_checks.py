"""The pre-flight check against a real server: views that cannot take the writes fail early,
and a server with tokens is reached with the connection flags' ClientConfig."""

from __future__ import annotations

import dataclasses
import time
import tomllib

import numpy as np
import pytest

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType, FeatureStatus, numpy_dtype
from featurestore.errors import ConflictError, UnavailableError
from featurestore.registry import Entity, Feature, JoinKey
from pipelines.checks import apply_views, check_views, expected_view
from pipelines.config import Pipeline, parse_pipeline
from pipelines.events import EXAMPLE_PIPELINE


def one_window(view: str) -> Pipeline:
    """The example pipeline with only its first window, writing to `view`."""
    pipeline = parse_pipeline(tomllib.loads(EXAMPLE_PIPELINE)["pipeline"][0])
    window = dataclasses.replace(pipeline.windows[0], view=view)
    return dataclasses.replace(pipeline, windows=(window,))


def test_check_names_every_view_that_cannot_take_the_writes(server):
    good = one_window("good")
    apply_views(server.target, [good], "card")
    check_views(server.target, [good])

    entities = {
        "renamed": Entity("card_renamed", (JoinKey("card", DType.INT64),)),
        "string_key": Entity("card_string", (JoinKey("card_id", DType.STRING),)),
        "two_keys": Entity(
            "card_pair", (JoinKey("card_id", DType.INT64), JoinKey("shop_id", DType.INT64))
        ),
    }
    pipelines = [good] + [one_window(v) for v in entities]
    views = [
        expected_view(p, p.windows[0], entities[p.windows[0].view].name) for p in pipelines[1:]
    ]
    extra = one_window("extra")
    base = expected_view(extra, extra.windows[0], "card")
    views.append(
        dataclasses.replace(base, features=(*base.features, Feature("refunds", DType.INT64)))
    )
    with FeatureStoreClient(server.target) as client:
        client.apply(list(entities.values()), views)

    with pytest.raises(ConflictError) as caught:
        check_views(server.target, [*pipelines, extra])
    message = str(caught.value)
    assert "view good " not in message
    assert "view renamed has entity 'card_renamed' with join keys [card INT64]" in message
    assert "view string_key has entity 'card_string' with join keys [card_id STRING]" in message
    assert "join keys [card_id INT64, shop_id INT64]" in message
    assert "only join key is 'card_id' INT64" in message
    assert (
        "view extra has feature refunds the pipeline does not write; remove it or add it to "
        "[pipeline.window.features]" in message
    )


def test_a_quiet_entitys_last_window_expires_and_a_view_without_the_ttl_fails_the_check(
    server,
):
    """Flink writes no empty window: the view's TTL (slide 60 s + watermark delay 3 s + 10 s)
    is what stops a window ended 74 s ago from being served as current."""
    pipeline = one_window("txn_5m")
    apply_views(server.target, [pipeline], "card")
    check_views(server.target, [pipeline])
    window = pipeline.windows[0]
    now_us = time.time_ns() // 1000
    ends = np.array([now_us - 74_000_000, now_us - 60_000_000], np.int64)
    with FeatureStoreClient(server.target) as client:
        assert client.get_feature_view("txn_5m").ttl_seconds == 73
        values = {a.name: np.ones(2, numpy_dtype(a.dtype)) for a in window.aggregates}
        client.write_features("txn_5m", {"card_id": np.array([1, 2])}, ends, values)
        found = client.get_online_features(["txn_5m:txn_count"], {"card_id": np.array([1, 2])})
        assert found.statuses["txn_5m:txn_count"].tolist() == [
            FeatureStatus.OUTSIDE_MAX_AGE,
            FeatureStatus.PRESENT,
        ]
        view = client.get_feature_view("txn_5m")
        client.apply([], [dataclasses.replace(view, ttl_seconds=0)])

    with pytest.raises(ConflictError) as caught:
        check_views(server.target, [pipeline])
    assert (
        "view txn_5m has ttl_seconds = 0, but the window's TTL is 73 s (slide + watermark "
        "delay + 10 s; Flink writes no empty window" in str(caught.value)
    )
    assert "apply the view with ttl_seconds = 73, or set ttl_s = 0 in the pipeline's window" in (
        str(caught.value)
    )
    no_limit = dataclasses.replace(pipeline, windows=(dataclasses.replace(window, ttl_s=0),))
    check_views(server.target, [no_limit])
    tumble = dataclasses.replace(window, kind="tumble", size_s=60.0, slide_s=60.0)
    with pytest.raises(ConflictError, match=r"TTL is 73 s \(size \+ watermark delay \+ 10 s;"):
        check_views(server.target, [dataclasses.replace(pipeline, windows=(tumble,))])


def test_check_reaches_a_server_with_tokens_and_names_the_flag_without_one(
    server_factory, tmp_path
):
    (tmp_path / "server.toml").write_text(
        '[auth]\nenabled = true\n[[auth.tokens]]\nname = "pipe"\ntoken = "s3cret"\n'
        'scopes = ["admin", "read:*", "write:*"]\n'
    )
    server = server_factory("--config", str(tmp_path / "server.toml"))
    good = one_window("good")
    with_token = ClientConfig(target=server.target, token="s3cret")
    apply_views(with_token, [good], "card")
    check_views(with_token, [good])

    with pytest.raises(UnavailableError, match="UNAUTHENTICATED") as caught:
        check_views(server.target, [good])
    assert f"from {server.target}: " in str(caught.value) and "--token" in str(caught.value)
