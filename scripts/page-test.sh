#!/usr/bin/env bash
# The cluster page in headless Chromium: a coordinator and two synthetic
# workers, a registered model and a few jobs; then the page is rendered
# (screenshot and DOM after its JavaScript ran) and checked for the worker
# ids, the model id and the completed jobs.
#
#   scripts/page-test.sh            # builds target/debug/corral first
#   CORRAL=path/to/corral SHOT=/tmp/page.png scripts/page-test.sh
#
# Needs chromium (Debian: apt-get install -y chromium).
set -euo pipefail
cd "$(dirname "$0")/.."

SHOT=${SHOT:-/tmp/page.png}
if [[ -z "${CORRAL:-}" ]]; then
  cargo build --quiet --bin corral
  CORRAL=target/debug/corral
fi
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[[ -n "$CHROMIUM" ]] || { echo "page-test: chromium not found (apt-get install -y chromium)" >&2; exit 1; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# Waits up to $2 seconds for $1 (a command) to succeed.
wait_for() {
  local deadline=$((SECONDS + $2))
  until eval "$1" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "page-test: timed out waiting for: $1" >&2; return 1; fi
    sleep 0.1
  done
}

# Both ports are bound by the coordinator (port 0) and read back from its log.
"$CORRAL" --log-format json coordinator --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --insecure-no-auth \
  --data-dir "$WORK/data" --heartbeat-interval-s 0.5 2>"$WORK/coord.log" &
PIDS+=($!)
wait_for "grep -q 'coordinator listening' '$WORK/coord.log'" 20
wait_for "grep -q 'coordinator HTTP listening' '$WORK/coord.log'" 20
GRPC=$(grep '"coordinator listening"' "$WORK/coord.log" | grep -o '"addr":"[0-9.:]*"' | head -1 | cut -d'"' -f4)
HTTP=$(grep 'coordinator HTTP listening' "$WORK/coord.log" | grep -o '"addr":"[0-9.:]*"' | head -1 | cut -d'"' -f4)
URL="http://$GRPC"
echo "page-test: coordinator gRPC $GRPC, HTTP $HTTP"

# A tiny model bundle.
mkdir -p "$WORK/models/sd-page/unet"
echo '{"name":"sd-page"}' >"$WORK/models/sd-page/model_index.json"
head -c 65536 /dev/zero >"$WORK/models/sd-page/unet/model.onnx"
"$CORRAL" models add sd-page --source "file://$WORK/models/sd-page" --coordinator "$URL"

for w in w-page-1 w-page-2; do
  "$CORRAL" worker --engine synthetic --synthetic-step-ms 5 --worker-id "$w" --coordinator "$URL" \
    --cache-dir "$WORK/cache-$w" 2>"$WORK/$w.log" &
  PIDS+=($!)
done
wait_for "\"$CORRAL\" workers --coordinator '$URL' | grep -q w-page-2" 20
wait_for "\"$CORRAL\" workers --coordinator '$URL' | grep -q w-page-1" 20

JOBS=4
for i in $(seq 1 $JOBS); do
  "$CORRAL" submit --model sd-page --prompt "page test $i" --seed "$i" --steps 2 --width 64 --height 64 \
    --out "$WORK/out-$i.png" --coordinator "$URL" >/dev/null 2>&1 &
  PIDS+=($!)
done
# Wait for the submissions (the last $JOBS pids) to come back completed.
for p in "${PIDS[@]: -$JOBS}"; do wait "$p"; done
ls "$WORK"/out-*.png >/dev/null

CHROME_FLAGS=(--headless --no-sandbox --disable-gpu --disable-background-networking
  --disable-component-update --disable-sync --no-first-run --window-size=1280,800
  --virtual-time-budget=5000)
rm -f "$SHOT"
"$CHROMIUM" "${CHROME_FLAGS[@]}" --user-data-dir="$(mktemp -d -p "$WORK")" \
  --screenshot="$SHOT" "http://$HTTP/" >"$WORK/chrome-shot.log" 2>&1
"$CHROMIUM" "${CHROME_FLAGS[@]}" --user-data-dir="$(mktemp -d -p "$WORK")" \
  --dump-dom "http://$HTTP/" >"$WORK/dom.html" 2>"$WORK/chrome-dom.log"

fail=0
check() {
  if grep -q -- "$1" "$WORK/dom.html"; then echo "page-test: ok: $2"; else echo "page-test: FAIL: $2" >&2; fail=1; fi
}
check 'data-worker="w-page-1"' "worker w-page-1 has a row"
check 'data-worker="w-page-2"' "worker w-page-2 has a row"
check 'data-model="sd-page"' "model sd-page has a column"
check "<b>$JOBS</b> completed" "$JOBS jobs shown completed"
check 'class="cell ' "a worker holds the model (a V/P/D cell)"
check '<polyline' "the throughput chart has a line"
check 'updated ' "the page polled /api/cluster"
size=$(stat -c %s "$SHOT" 2>/dev/null || echo 0)
if ((size > 10000)); then echo "page-test: ok: screenshot $SHOT ($size bytes)"; else
  echo "page-test: FAIL: screenshot $SHOT missing or trivial ($size bytes)" >&2; fail=1; fi
if ((fail)); then
  echo "--- DOM ---" >&2; cat "$WORK/dom.html" >&2
  exit 1
fi
echo "page-test: passed"
