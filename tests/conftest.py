"""Shared test wiring.

Fixtures live in tests/fixtures/, one module per concern, so that each part of
the system owns its own fixtures:
- services.py: real redis-server and S3-speaking HTTP servers on free loopback ports
- store.py:    a real kvstore gRPC server on a free port (in-process and subprocess)
- model.py:    the real SmolLM2-135M-Instruct model, loaded once per session
"""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.store",
    "tests.fixtures.model",
]
