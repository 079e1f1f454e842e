"""Invalid configuration through the real CLI: one line naming the field, exit 2, no traceback.

Each case is a YAML file with one bad value, in every config section and in both maps
(``auth.tokens``, ``quotas.per_tenant``), run as ``python3 -m kvstore serve --config``
in a subprocess, exactly as an operator or Kubernetes would start the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: name -> (YAML text, what the one line must name)
CASES: dict[str, tuple[str, str]] = {
    "server": ("server:\n  workers: 0\n", "server.workers"),
    "server-type": ("server:\n  port: http\n", "server.port"),
    "server-ack": ("server:\n  ack: durable\ndisk:\n  enabled: false\n", "server.ack"),
    "memory": ("memory:\n  max_bytes: plenty\n", "memory.max_bytes"),
    "disk": ("disk:\n  fsync: sometimes\n", "disk.fsync"),
    "redis": ("redis:\n  enabled: true\n  url: http://x\n", "redis.url"),
    "redis-budget": ("redis:\n  socket_timeout_s: 1.0\n  budget_s: 0.5\n", "redis.budget_s"),
    "redis-nan": ("redis:\n  socket_timeout_s: .nan\n", "redis.socket_timeout_s"),
    "s3": ("s3:\n  endpoint_url: minio:9000\n", "s3.endpoint_url"),
    "s3-bucket": ("s3:\n  bucket: my bucket/x\n", "s3.bucket"),
    "s3-timeout": ("s3:\n  timeout_s: -1\n", "s3.timeout_s"),
    "auth-tenant": ("auth:\n  tokens:\n    tok-1: 'bad tenant!'\n", "auth.tokens"),
    "auth-empty-tenant": ("auth:\n  tokens:\n    tok-1: ''\n", "auth.tokens"),
    "auth-no-value": ("auth:\n  tokens:\n    tok-1:\n", "auth.tokens"),
    "auth-list": ("auth:\n  tokens: [a, b]\n", "auth.tokens"),
    "auth-tls": ("auth:\n  tls_cert: /nonexistent.pem\n  tls_key: /nonexistent.key\n", "auth.tls_cert"),
    "quotas-tenant": ("quotas:\n  per_tenant:\n    'bad tenant!': 1GiB\n", "quotas.per_tenant"),
    "quotas-value": ("quotas:\n  per_tenant:\n    team-a: lots\n", "quotas.per_tenant"),
    "quotas-negative": ("quotas:\n  per_tenant:\n    team-a: -5\n", "quotas.per_tenant"),
    "quotas-default": ("quotas:\n  default_max_bytes: -1\n", "quotas.default_max_bytes"),
    "metrics": ("metrics:\n  port: 70000\n", "metrics.port"),
    "unknown-field": ("server:\n  prot: 1\n", "server.prot"),
    "unknown-section": ("nope:\n  x: 1\n", "nope"),
    "yaml-syntax": ("server: {port: [1\n", "not valid YAML"),
}


def test_every_config_section_has_a_case() -> None:
    from kvstore.config import SECTIONS

    covered = {text.split(":", 1)[0] for text, _ in CASES.values()}
    assert set(SECTIONS) <= covered, set(SECTIONS) - covered


def _serve(config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONPATH"] = str(REPO)
    env["XDG_CACHE_HOME"] = str(home)  # never touch the user's disk tier, even if a case slipped through
    return subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )


def test_every_invalid_field_is_one_line_naming_it_and_exit_2(tmp_path: Path) -> None:
    files = {}
    for name, (text, _) in CASES.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(text)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(
            zip(files, pool.map(lambda f: _serve(f, tmp_path / "home"), files.values()), strict=True)
        )
    for name, (_, field) in CASES.items():
        proc = results[name]
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        assert len(lines) == 1, (name, lines)
        assert field in lines[0] and "invalid configuration" in lines[0], (name, lines[0])
    # Secrets never reach the log: the token of a bad auth.tokens entry is not echoed.
    for name in ("auth-tenant", "auth-empty-tenant", "auth-no-value"):
        assert "tok-1" not in results[name].stderr, results[name].stderr


@pytest.mark.parametrize(
    "env",
    [
        {"KVSTORE_AUTH__TOKENS": "tok-1=bad tenant!"},
        {"KVSTORE_QUOTAS__PER_TENANT": "bad tenant!=1GiB"},
    ],
)
def test_maps_from_the_environment_are_checked_too(tmp_path: Path, env: dict[str, str]) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("server:\n  port: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path)},
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid tenant name 'bad tenant!'" in proc.stderr


def test_bad_tls_material_is_one_line_naming_the_field_and_exit_2(tmp_path: Path) -> None:
    """Files that exist but cannot serve TLS used to start the server and fail at bind time
    ("cannot listen ... is another server using the port?", exit 1)."""
    from kvstore.testing.certs import generate_test_pki

    pki = generate_test_pki(tmp_path / "pki")
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA!!!!\n-----END CERTIFICATE-----\n")
    cert, key = pki.server_cert, pki.server_key
    #: name -> (tls_cert, tls_key, tls_client_ca, the field the line must name, a phrase it must hold)
    cases = {
        "cert-not-pem": (junk, key, None, "auth.tls_cert", "not a PEM certificate"),
        "cert-broken-pem": (broken, key, None, "auth.tls_cert", "no valid PEM certificate"),
        "key-not-pem": (cert, junk, None, "auth.tls_key", "not a PEM private key"),
        "key-of-another-cert": (cert, pki.client_key, None, "auth.tls_key", "does not match"),
        "ca-not-pem": (cert, key, junk, "auth.tls_client_ca", "not a PEM certificate"),
        "ca-broken-pem": (cert, key, broken, "auth.tls_client_ca", "no valid PEM certificate"),
    }
    files = {}
    for name, (c, k, ca, _, _) in cases.items():
        files[name] = tmp_path / f"{name}.yaml"
        text = f"auth:\n  tls_cert: '{c}'\n  tls_key: '{k}'\n" + (f"  tls_client_ca: '{ca}'\n" if ca else "")
        files[name].write_text(text + "disk:\n  enabled: false\n")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(
            zip(files, pool.map(lambda f: _serve(f, tmp_path / "home"), files.values()), strict=True)
        )
    for name, (_, _, _, field, phrase) in cases.items():
        proc = results[name]
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert lines[0].startswith("kvstore serve: invalid configuration: " + field), (name, lines[0])
        assert phrase in lines[0] and "cannot listen" not in lines[0], (name, lines[0])


def test_a_kvstore_variable_that_names_no_field_is_warned_about(tmp_path: Path) -> None:
    """KVSTORE_SERVER_PORT (one underscore) used to be ignored without a word."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(
        PYTHONPATH=str(REPO),
        XDG_CACHE_HOME=str(tmp_path),
        KVSTORE_SERVER_PORT="6000",
        KVSTORE_SERVER__WORKERS="3",
        KVSTORE_TARGET="127.0.0.1:1",  # a client's variable: no warning
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, proc.stderr
    assert "KVSTORE_SERVER_PORT names no config field" in warnings[0]
    assert "did you mean KVSTORE_SERVER__PORT?" in warnings[0]
    import json

    config = json.loads(proc.stdout)
    assert config["server"]["port"] == 50051 and config["server"]["workers"] == 3
