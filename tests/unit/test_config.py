"""Config: defaults < file < environment < flags, and validation that names the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.cli import build_parser, serve_overrides
from kvstore.config import GiB, MiB, StoreConfig, config_as_dict, load_config, parse_bytes


def test_defaults_are_ram_plus_disk_under_the_user_cache() -> None:
    config = load_config(environ={})
    assert config.server.port == 50051
    assert config.server.max_message_bytes == 72 * MiB and config.server.max_blob_bytes == 64 * MiB
    assert config.memory.max_bytes == 2 * GiB
    assert config.disk.enabled and config.disk.path.endswith("kvstore/disk")
    assert not config.redis.enabled and not config.s3.enabled
    assert config.auth.tokens == {} and config.metrics.port == 0


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "kv.yaml"
    path.write_text(
        "server:\n  port: 7000\n  workers: 4\n"
        "memory:\n  max_bytes: 1GiB\n"
        "redis:\n  url: redis://127.0.0.1:7777/1\n"
        "auth:\n  tokens: {s3cret: acme}\n"
        "quotas:\n  per_tenant: {acme: 10MiB}\n"
    )
    from_file = load_config(path, environ={})
    assert (from_file.server.port, from_file.server.workers, from_file.memory.max_bytes) == (7000, 4, GiB)
    assert from_file.auth.tokens == {"s3cret": "acme"} and from_file.quotas.per_tenant == {"acme": 10 * MiB}

    env = {"KVSTORE_SERVER__PORT": "6000", "KVSTORE_REDIS__ENABLED": "true", "KVSTORE_OTHER_THING": "x"}
    from_env = load_config(path, environ=env)
    assert from_env.server.port == 6000 and from_env.redis.enabled
    assert from_env.server.workers == 4  # untouched by env: still from the file

    assert (
        not from_env.memory.prefault
        and load_config(path, environ={"KVSTORE_MEMORY__PREFAULT": "true"}).memory.prefault
    )

    args = build_parser().parse_args(
        ["serve", "--port", "5000", "--memory-bytes", "512MiB", "--no-disk", "--memory-prefault"]
    )
    final = load_config(path, environ=env, overrides=serve_overrides(args))
    assert final.server.port == 5000 and final.memory.max_bytes == 512 * MiB and final.memory.prefault
    assert not final.disk.enabled and final.redis.enabled and final.server.workers == 4


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "kv.toml"
    path.write_text('[s3]\nenabled = true\nendpoint_url = "http://127.0.0.1:9000"\nbucket = "kv"\n')
    config = load_config(path, environ={})
    assert config.s3.enabled and config.s3.bucket == "kv"


def test_redis_and_s3_flags_enable_their_tiers() -> None:
    args = build_parser().parse_args(["serve", "--redis-url", "redis://h:1/0", "--s3-endpoint", "http://h:2"])
    config = load_config(environ={}, overrides=serve_overrides(args))
    assert config.redis.enabled and config.redis.url == "redis://h:1/0"
    assert config.s3.enabled and config.s3.endpoint_url == "http://h:2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", MiB),
        ("64MiB", 64 * MiB),
        ("2GiB", 2 * GiB),
        ("2 gib", 2 * GiB),
        ("500MB", 500_000_000),
        ("1.5KiB", 1536),
        ("4k", 4096),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.3B", "2 GiBs"])
def test_parse_bytes_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVSTORE_SERVER__PORT": "70000"}, "server.port must be a TCP port"),
        ({"KVSTORE_SERVER__PORT": "http"}, "server.port: invalid value 'http'"),
        ({"KVSTORE_SERVER__WORKERS": "0"}, "server.workers must be > 0"),
        ({"KVSTORE_SERVER__MAX_BLOB_BYTES": "80MiB"}, "server.max_message_bytes"),
        ({"KVSTORE_DISK__FSYNC": "sometimes"}, "disk.fsync must be one of"),
        ({"KVSTORE_REDIS__ENABLED": "maybe"}, "redis.enabled: invalid value"),
        ({"KVSTORE_REDIS__ENABLED": "1", "KVSTORE_REDIS__URL": "http://x"}, "redis.url must start with"),
        ({"KVSTORE_S3__ENDPOINT_URL": "minio:9000"}, "s3.endpoint_url must start with"),
        ({"KVSTORE_S3__ACCESS_KEY_ID": "AK"}, "must be set together"),
        (
            {"KVSTORE_AUTH__TLS_CERT": "/nonexistent.pem", "KVSTORE_AUTH__TLS_KEY": "/nonexistent.key"},
            "no such file",
        ),
        ({"KVSTORE_SERVER__NOPE": "1"}, "unknown field server.nope"),
        ({"KVSTORE_NOPE__PORT": "1"}, "unknown config section 'nope'"),
        ({"KVSTORE_MEMORY__MAX_BYTES": "plenty"}, "memory.max_bytes: invalid value"),
    ],
)
def test_invalid_values_name_the_field(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(environ=env)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  prot: 1\n")
    with pytest.raises(ValueError, match=r"config file .*unknown field server.prot"):
        load_config(bad, environ={})
    ini = tmp_path / "kv.ini"
    ini.write_text("[server]\n")
    with pytest.raises(ValueError, match="yaml"):
        load_config(ini, environ={})


def test_config_is_frozen_and_validated_on_replace() -> None:
    config = StoreConfig()
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="memory.max_bytes"):
        config.replace(memory={"max_bytes": -1})
    assert config.replace(server={"port": 1}).server.port == 1


def test_secrets_are_redacted() -> None:
    config = load_config(environ={"KVSTORE_AUTH__TOKENS": "tok1=acme,tok2=beta"})
    assert config.auth.tokens == {"tok1": "acme", "tok2": "beta"}
    text = str(config_as_dict(config))
    assert "tok1" not in text and "acme" in text and "beta" in text


def test_backends_are_built_from_their_config_sections(tmp_path: Path) -> None:
    """Backend.from_config passes every section field the constructor takes, and only those."""
    from kvstore.backends.disk import DiskBackend
    from kvstore.backends.memory import MemoryBackend

    config = load_config(
        None,
        environ={},
        overrides={
            "memory.max_bytes": "3MiB",
            "disk.path": str(tmp_path / "d"),
            "disk.max_bytes": "1GiB",
            "disk.fsync": "always",
            "disk.segment_bytes": "8MiB",
        },
    )
    assert MemoryBackend.from_config(config.memory).max_bytes == 3 * MiB
    disk = DiskBackend.from_config(config.disk)  # `enabled` is not a constructor parameter
    try:
        assert (disk.path, disk.max_bytes, disk.fsync, disk.segment_bytes) == (
            str(tmp_path / "d"),
            GiB,
            "always",
            8 * MiB,
        )
    finally:
        disk.close()


def test_env_warnings_name_the_variable_and_the_nearest_field() -> None:
    from kvstore.config import env_warnings

    env = {
        "KVSTORE_SERVER_PORT": "6000",  # one underscore: the field is KVSTORE_SERVER__PORT
        "KVSTORE_MEMORY_MAXBYTES": "1GiB",  # no split works: the nearest by spelling
        "KVSTORE_NOTHING_LIKE_IT": "x",
        "KVSTORE_SERVER__PORT": "7000",  # a field: checked by load_config, not warned about
        "KVSTORE_TARGET": "a:1",  # read by clients
        "KVSTORE_SERVICE_HOST": "10.0.0.1",  # Kubernetes service links of a Service named kvstore
        "KVSTORE_PORT": "tcp://10.0.0.1:50051",
        "KVSTORE_PORT_50051_TCP_ADDR": "10.0.0.1",
        "KVSTORE_HEADLESS_SERVICE_PORT_GRPC": "50051",
        "OTHER_SERVER_PORT": "1",
    }
    warnings = env_warnings(env)
    assert len(warnings) == 3, warnings
    by_name = {w.split()[2]: w for w in warnings}
    assert by_name["KVSTORE_SERVER_PORT"].endswith("did you mean KVSTORE_SERVER__PORT?")
    assert by_name["KVSTORE_MEMORY_MAXBYTES"].endswith("did you mean KVSTORE_MEMORY__MAX_BYTES?")
    assert "did you mean" not in by_name["KVSTORE_NOTHING_LIKE_IT"]
    assert all("KVSTORE_<SECTION>__<FIELD>" in w for w in warnings)
    assert load_config(environ=env).server.port == 7000
