#!/usr/bin/env bash
# A short run of each kind of simulator experiment (docs/sim.md), on a small fleet, checking
# that each produces its figures: steady state with goodput and paired intervals, an ablation,
# the cold-start ramp, a sweep point, a surge (with and without the surge response), a
# scale-in by deletion cost, at random and abrupt, and the Belady replay bound.
# Usage: scripts/sim-smoke.sh [path/to/corral]   (default: target/debug/corral)
set -euo pipefail
cd "$(dirname "$0")/.."
CORRAL="${1:-target/debug/corral}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

cat > "$OUT/small.toml" <<'TOML'
# 24 nodes, 120 models; warm-up of 2,000 jobs, 8 minutes measured.
nodes = 24
models = 120
rate = 1.5
warmup_jobs = 2000.0
measure_min = 8.0
drain_min = 5.0
bisect_lo = 0.75
bisect_hi = 6.0
goodput_grid = 3
bisect_steps = 1
TOML

sim() { "$CORRAL" sim --config "$OUT/small.toml" --threads 2 --format json "$@"; }
check() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); $2" "$1"; }

echo "steady state + ablation (goodput, paired with corral)"
sim --scenario s1 --seeds 2 --policies corral,corral-norepl,b7 > "$OUT/steady.json"
check "$OUT/steady.json" '
p = {x["policy"]: x for x in d["policies"]}
assert p["corral"]["goodput"] is not None, "no goodput"
assert "goodput" in p["b7-greedy"]["paired_with_corral"], "no paired difference"
for x in p.values():
    # Belady replay of the same placements never needs more than LRU.
    if x["gb_per_job_belady_replay"] is not None:
        assert x["gb_per_job_belady_replay"] <= x["gb_per_job_lru_replay"] + 1e-12, x["policy"]
    assert x["capacity_jobs_s"] > 0
'

echo "cold start"
sim --scenario s1 --cold-start --warmup-min 0 --hours 0.4 --seeds 1 --policies corral,b7 --goodput-grid 0 > "$OUT/cold.json"
check "$OUT/cold.json" 'assert d["cold_start"]; assert "cold_ramp_min" in d["policies"][0]'

echo "sweep point"
sim --scenario s1 --sweep disk_gb --points 25 --seeds 1 --policies corral > "$OUT/sweep.json"
check "$OUT/sweep.json" 'assert d["sweep"] == "disk_gb"; assert d["points"][0]["experiment"]["params"]["disk_gb"] == 25'

echo "surge"
# The same fleet, warmed up by time so that the surge starts at a fixed minute.
grep -v -e '^warmup_jobs' -e '^measure_min' -e '^goodput_grid' "$OUT/small.toml" > "$OUT/surge.toml"
cat >> "$OUT/surge.toml" <<'TOML'
warmup_jobs = 0.0
warmup_min = 10.0
ramp_min = 5.0
length_h = 0.5
goodput_grid = 0
[[surges]]
rank = 20
size_gb = 2.13
share = 0.3
start_min = 12.0
duration_min = 8.0
TOML
"$CORRAL" sim --config "$OUT/surge.toml" --threads 2 --format json --scenario s1 --seeds 1 --policies corral,corral-nosurge,b7 \
  --plots-dir "$OUT/plots" > "$OUT/surge.json"
check "$OUT/surge.json" '
p = d["policies"][0]
assert "surge1_recovery_min" in p, "no recovery"
s = p["surge_series"][0]["surges"][0]
assert len(s["per_minute"]) > 5, "no per-minute series"
'
test -s "$OUT/plots/s1-surge1-model-p95.svg"
test -s "$OUT/plots/s1-surge1-model-latency.csv"

echo "scale-in (by deletion cost, at random, abrupt)"
for rule in cost random abrupt; do
  grep -v -e '^\[\[surges' -e '^rank' -e '^size_gb' -e '^share' -e '^start_min' -e '^duration_min' \
    "$OUT/surge.toml" > "$OUT/scale-$rule.toml"
  # Light enough that the 18 nodes left are not overloaded.
  sed -i -e 's/^rate = .*/rate = 0.5/' -e 's/^drain_min = .*/drain_min = 15.0/' "$OUT/scale-$rule.toml"
  if [ "$rule" = abrupt ]; then
    printf '[scale_in]\nat_min = 12.0\nnodes = 6\nabrupt = true\n' >> "$OUT/scale-$rule.toml"
  else
    printf '[scale_in]\nat_min = 12.0\nnodes = 6\nrule = "%s"\n' "$rule" >> "$OUT/scale-$rule.toml"
  fi
  "$CORRAL" sim --config "$OUT/scale-$rule.toml" --threads 2 --format json --scenario s1 --seeds 1 \
    --policies corral,b7-late > "$OUT/scale-$rule.json"
  check "$OUT/scale-$rule.json" '
for p in d["policies"]:
    assert p["scale_in_lost"] == 0, p["policy"]
    assert p["scale_in_gb"] is not None and "scale_in_p95_s" in p["per_seed"]
    assert p["scale_in_prefetch_gb"] <= p["scale_in_gb"] + 1e-9, p["policy"]
'
done
echo "sim smoke: ok"
