#!/usr/bin/env bash
# Installs ONNX Runtime for Corral's pipeline: pip-installs the `onnxruntime` wheel (user site
# unless in a virtualenv; ONNXRUNTIME_PACKAGE=onnxruntime-gpu for the CUDA build) and copies its
# versioned shared library into ./.ort/ (gitignored), where pipeline::runtime::init() looks.
#
# Usage: scripts/install-onnxruntime.sh [VERSION]     e.g. scripts/install-onnxruntime.sh 1.32.0
set -euo pipefail

PKG="${ONNXRUNTIME_PACKAGE:-onnxruntime}"
SPEC="$PKG"
if [ $# -ge 1 ]; then SPEC="$PKG==$1"; fi
PY="${PYTHON:-python3}"

if ! "$PY" -c "import onnxruntime" 2>/dev/null || [ $# -ge 1 ]; then
  USER_FLAG="--user"
  if "$PY" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then USER_FLAG=""; fi
  "$PY" -m pip install $USER_FLAG --upgrade "$SPEC"
fi

CAPI="$("$PY" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
LIB="$(ls "$CAPI"/libonnxruntime.so.* 2>/dev/null | grep -v providers | sort -V | tail -n 1 || true)"
if [ -z "$LIB" ]; then
  echo "no libonnxruntime.so.* in $CAPI" >&2
  exit 1
fi

mkdir -p .ort
cp -f "$LIB" .ort/
# The CUDA/TensorRT providers (onnxruntime-gpu) must sit next to the library.
for p in "$CAPI"/libonnxruntime_providers_*.so; do
  [ -e "$p" ] && cp -f "$p" .ort/
done
OUT="$(cd .ort && pwd)/$(basename "$LIB")"
echo "ONNX Runtime installed: $OUT"
echo "(found automatically from the repository root; elsewhere: export ORT_DYLIB_PATH=$OUT)"
