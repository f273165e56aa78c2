#!/usr/bin/env bash
# The main job end to end on this machine: installs ONNX Runtime (PyPI wheel) if it is missing,
# builds corral, and runs `corral demo`: a coordinator, two workers (one with the bundled tiny
# model preloaded, one empty), jobs through the client API, images in corral-demo/images/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-onnxruntime.sh >/dev/null
cargo run --quiet -- demo "$@"
