"""CoordinatorConfig: one frozen value for every coordinator setting, and GrpcEngine's keywords."""

from __future__ import annotations

import dataclasses

import pytest

from shoal.errors import ConfigError
from shoal.runtime import Store
from shoal.runtime.grpc import CoordinatorConfig, GrpcEngine
from shoal.wire import WireLimits


def test_defaults_and_derived_limits() -> None:
    config = CoordinatorConfig(listen="127.0.0.1:0", insecure=True, heartbeat_s=2.0)
    assert config.silent_after_s == 3 * 2.0 + 5.0  # three heartbeats and 5 s
    assert config.reply_limit == WireLimits().max_bytes
    tuned = dataclasses.replace(config, liveness_s=7.0, max_reply_bytes=1000)
    assert (tuned.silent_after_s, tuned.reply_limit) == (7.0, 1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({}, "serves over TLS"),
        ({"insecure": True, "chunk_bytes": 0}, "chunk_bytes"),
        ({"insecure": True, "heartbeat_s": 0}, "heartbeat_s"),
        ({"insecure": True, "handshake_timeout_s": -1}, "handshake_timeout_s"),
        ({"insecure": True, "max_nodes": 0}, "max_nodes"),
        ({"insecure": True, "data_listen": "nowhere"}, "data_listen"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(fields: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        CoordinatorConfig(listen="127.0.0.1:0", **fields)


def test_engine_takes_a_config_or_its_fields_as_keywords(tmp_path) -> None:
    with Store(tmp_path / "fl.db") as store:
        config = CoordinatorConfig(listen="127.0.0.1:0", insecure=True, seed=5)
        assert GrpcEngine(registry=store, config=config).config is config
        changed = GrpcEngine(registry=store, config=config, seed=6).config
        assert (changed.seed, changed.listen) == (6, "127.0.0.1:0")
        short = GrpcEngine(registry=store, listen="127.0.0.1:0", insecure=True, seed=7)
        assert short.config == dataclasses.replace(config, seed=7)
        with pytest.raises(ConfigError, match="no setting 'heartbeat'"):
            GrpcEngine(registry=store, listen="127.0.0.1:0", insecure=True, heartbeat=1.0)
        with pytest.raises(ConfigError, match="listen"):
            GrpcEngine(registry=store, insecure=True)
