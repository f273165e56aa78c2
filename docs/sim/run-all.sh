#!/usr/bin/env bash
# Reproduces every figure of docs/sim.md: JSON results (--json-out) and SVG
# plots into docs/sim/, then the Markdown tables (docs/sim/tables.py).
# Usage: docs/sim/run-all.sh [kind...]   kinds: steady ablations cold surge
#        surge-target scale-in sweeps (default: all). SEEDS (10), STEADY_SEEDS (SEEDS),
#        SWEEP_SEEDS (5) and THREADS (2) override the seed counts and threads.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin corral
C=target/release/corral
D=docs/sim
SEEDS="${SEEDS:-10}"
SWEEP_SEEDS="${SWEEP_SEEDS:-5}"
T="--threads ${THREADS:-2}"
KINDS="${*:-surge surge-target scale-in ablations cold steady sweeps}"
BASELINES=b6-prop,b7,b7-late,b7-prefetch

for kind in $KINDS; do
  case $kind in
  steady)
    # Goodput from converged caches (100,000-job warm-up, 30 min measured).
    $C sim --scenario s1 --seeds "${STEADY_SEEDS:-$SEEDS}" $T --policies corral,b7,b7-late,b7-prefetch \
      --json-out $D/s1-steady.json --plots-dir $D >/dev/null ;;
  ablations)
    # At the reference rate (20 jobs/s), no goodput search.
    $C sim --scenario s1 --seeds "$SEEDS" $T --goodput-grid 0 --rate 20 \
      --policies corral,corral-norepl,corral-early,corral-nobw,corral-nosurge,$BASELINES \
      --json-out $D/s1-ablations.json >/dev/null ;;
  cold)
    # From empty disks, no warm-up: minutes until p95 stays within 60 s.
    $C sim --scenario s1 --cold-start --warmup-min 0 --hours 1 --rate 20 --goodput-grid 0 \
      --seeds "$SEEDS" $T --policies corral,$BASELINES --json-out $D/cold-start.json >/dev/null
    # The same at 0.7 x the best baseline's steady-state goodput.
    $C sim --scenario s1 --cold-start --warmup-min 0 --hours 1 --rate 14.2 --goodput-grid 0 \
      --seeds "$SEEDS" $T --policies corral,b7-late,b7-prefetch --json-out $D/cold-start-at-14.json >/dev/null ;;
  surge)
    for s in surge-sd15 surge-sdxl; do
      $C sim --scenario $s --seeds "$SEEDS" $T --policies corral,corral-nosurge,b7,b7-late \
        --json-out $D/$s.json --plots-dir $D >/dev/null
    done ;;
  surge-target)
    # The issue's condition: 0.7 x the best baseline's steady-state goodput
    # (b7-prefetch, 20.3 jobs/s in s1-steady.json): 14.2 jobs/s.
    for s in surge-sd15 surge-sdxl; do
      $C sim --scenario $s --rate 14.2 --seeds "$SEEDS" $T --policies corral,corral-nosurge,b7-prefetch \
        --json-out $D/$s-at-14.json --plots-dir $D/at-14 >/dev/null
    done ;;
  scale-in)
    for s in scale-in scale-in-random; do
      $C sim --scenario $s --seeds "$SEEDS" $T --policies corral,b7-late \
        --json-out $D/$s.json >/dev/null
    done
    # The same 40 nodes vanishing like crashed hosts (no GoingAway).
    $C sim --scenario scale-in-abrupt --seeds "$SEEDS" $T --policies corral,corral-norepl,b7-late \
      --json-out $D/scale-in-abrupt.json >/dev/null ;;
  sweeps)
    # A quarter-size fleet (docs/sim/sweep-small.toml), tunables frozen.
    for sw in zipf_s:0.6,1.0,1.3 bw_median_mbit:50,200,950 hazard_per_h:0.01,0.05,0.1 \
              models:200,1000,10000 disk_gb:25,50,100; do
      f=${sw%%:*}
      $C sim --scenario s1 --config $D/sweep-small.toml --sweep "$f" --points "${sw#*:}" \
        --seeds "$SWEEP_SEEDS" $T --policies corral,b7-late --bisect-steps 3 --json-out $D/sweep-$f.json \
        --plots-dir $D >/dev/null
    done ;;
  *) echo "unknown kind $kind" >&2; exit 2 ;;
  esac
done
python3 $D/tables.py $D > $D/tables.md
echo "tables: $D/tables.md"
