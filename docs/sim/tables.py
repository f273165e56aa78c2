#!/usr/bin/env python3
"""Markdown tables for docs/sim.md from the JSON that `corral sim --json-out`
writes (docs/sim/run-all.sh makes them). Standard library only.

Every cell is a mean over seeds with its 95% interval (Student t); a
comparison is the mean of per-seed differences on the same trace with its
interval. Usage: python3 docs/sim/tables.py [DIR] (default: docs/sim).
"""

import json
import math
import os
import sys

# Two-sided 95% Student t quantiles by degrees of freedom.
T95 = [0, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086]


def t95(df):
    return T95[df] if df < len(T95) else 1.96


def mean_ci(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan")
    if any(math.isinf(x) for x in v):
        return float("inf"), float("nan")
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in v) / (len(v) - 1)
    return m, t95(len(v) - 1) * math.sqrt(var / len(v))


def paired(a, b):
    if not a or not b or len(a) != len(b):
        return float("nan"), float("nan")
    return mean_ci([x - y if x is not None and y is not None else None for x, y in zip(a, b)])


def fmt(mc, digits=1):
    m, h = mc
    if math.isinf(m):
        return "inf"
    if math.isnan(m):
        return "-"
    if math.isnan(h):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def load(d, name):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def seeds(p, k):
    v = p.get("per_seed", {}).get(k)
    if v is None and k == "goodput":
        v = p.get("goodput_per_seed")
    # The JSON writes infinity as "inf" and NaN as null.
    return [float("inf") if x == "inf" else x for x in (v or [])]


def by_policy(exp):
    return {p["policy"]: p for p in exp["policies"]}


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def steady(exp, title):
    ps = by_policy(exp)
    c = ps.get("corral")
    n = max(p["seeds"] for p in ps.values())
    rows = []
    for name, p in ps.items():
        diff = "" if name == "corral" else fmt(paired(seeds(c, "goodput"), seeds(p, "goodput")))
        rows.append([name, fmt(mean_ci(seeds(p, "goodput"))), diff,
                     fmt(mean_ci(seeds(p, "p95_s"))),
                     fmt(mean_ci(seeds(p, "gb_per_job")), 4),
                     fmt(mean_ci(seeds(p, "gb_per_job_belady_replay")), 4),
                     fmt(mean_ci(seeds(p, "capacity_jobs_s")))])
    return f"#### {title} ({n} seeds)\n\n" + table(
        ["policy", "goodput (jobs/s)", "corral − it", "p95 at reference (s)", "GB/job",
         "GB/job, Belady replay", "GPU capacity bound (jobs/s)"], rows)


def at_rate(exp, title, metrics):
    ps = by_policy(exp)
    c = ps.get("corral")
    n = max(p["seeds"] for p in ps.values())
    rows = []
    for name, p in ps.items():
        row = [name]
        for k, digits in metrics:
            row.append(fmt(mean_ci(seeds(p, k)), digits))
            row.append("" if name == "corral" or c is None else fmt(paired(seeds(c, k), seeds(p, k)), digits))
        rows.append(row)
    header = ["policy"]
    for k, _ in metrics:
        header += [k, f"corral − it ({k})"]
    return f"#### {title} ({n} seeds)\n\n" + table(header, rows)


def sweep(sw):
    field = sw["sweep"]
    rows = []
    for pt in sw["points"]:
        ps = by_policy(pt["experiment"])
        c = ps.get("corral")
        for name, p in ps.items():
            if name == "corral":
                continue
            rows.append([pt["value"], fmt(mean_ci(seeds(c, "goodput"))), name,
                         fmt(mean_ci(seeds(p, "goodput"))),
                         fmt(paired(seeds(c, "goodput"), seeds(p, "goodput")))])
    return f"#### Sweep of {field}\n\n" + table(
        [field, "corral goodput", "baseline", "its goodput", "corral − it"], rows)


def scale_in(cost, rnd):
    a, b = by_policy(cost), by_policy(rnd)
    rows = []
    for name in a:
        if name not in b:
            continue
        row = [name]
        for k, digits in [("scale_in_p95_s", 1), ("scale_in_gb", 0), ("scale_in_lost", 0)]:
            row += [fmt(mean_ci(seeds(a[name], k)), digits), fmt(mean_ci(seeds(b[name], k)), digits),
                    fmt(paired(seeds(a[name], k), seeds(b[name], k)), digits)]
        rows.append(row)
    n = max(p["seeds"] for p in a.values())
    return f"#### Scale-in: 40 of 200 nodes at minute 90 ({n} seeds)\n\n" + table(
        ["policy", "p95 15 min after, by cost (s)", "random", "cost − random",
         "GB downloaded 30 min after, by cost", "random", "cost − random",
         "jobs lost, by cost", "random", "cost − random"], rows)


# (scenario, metric, digits) compared before and after the replication rule.
RULE_METRICS = [("s1", "p95_s", 1), ("s1", "gb_per_job", 4), ("s2", "p95_s", 1),
                ("s2", "gb_per_job", 4), ("s3", "p95_s", 1), ("s3", "storm_p99_s", 1),
                ("s3", "gb_per_job", 4), ("surge-sd15", "surge1_recovery_min", 1),
                ("surge-sd15", "surge1_all_p95_s", 1), ("surge-sdxl", "surge1_recovery_min", 1),
                ("surge-sdxl", "surge1_all_p95_s", 1), ("scale-in", "scale_in_p95_s", 1),
                ("scale-in", "scale_in_gb", 0)]


def replication_rule(d):
    """Corral before/after the free-disk replication rule (replication-rule/)."""
    rows = []
    n = 0
    for sc, k, digits in RULE_METRICS:
        old, new = load(d, f"old-{sc}.json"), load(d, f"new-{sc}.json")
        if not old or not new:
            continue
        a, b = by_policy(old)["corral"], by_policy(new)["corral"]
        n = max(n, b["seeds"])
        rows.append([sc, k, fmt(mean_ci(seeds(a, k)), digits), fmt(mean_ci(seeds(b, k)), digits),
                     fmt(paired(seeds(b, k), seeds(a, k)), digits)])
    if not rows:
        return None
    return f"#### Replication rule: before and after, Corral at 20 jobs/s ({n} seeds)\n\n" + table(
        ["scenario", "metric", "before", "after", "after − before"], rows)


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "docs/sim"
    parts = []
    e = load(d, "s1-steady.json")
    if e:
        parts.append(steady(e, "S1 steady state: goodput from converged caches"))
    e = load(d, "s1-ablations.json")
    if e:
        parts.append(at_rate(e, "S1 at the reference rate: ablations and variants",
                             [("p95_s", 1), ("gb_per_job", 4), ("gb_per_job_belady_replay", 4)]))
    for name, rate in [("cold-start", 20), ("cold-start-at-14", 14.2)]:
        e = load(d, f"{name}.json")
        if e:
            parts.append(at_rate(e, f"Cold start from empty disks at {rate} jobs/s",
                                 [("cold_ramp_min", 1), ("p95_s", 1), ("aborted_runs", 1)]))
    for name, rate in [("surge-sd15", 20), ("surge-sdxl", 20), ("surge-sd15-at-14", 14.2),
                       ("surge-sdxl-at-14", 14.2)]:
        e = load(d, f"{name}.json")
        if e:
            parts.append(at_rate(e, f"{name}: surge model to 30% of {rate} jobs/s for 20 min",
                                 [("surge1_recovery_min", 1), ("surge1_model_p95_s", 1),
                                  ("surge1_all_p95_s", 1), ("surge1_lost", 0)]))
    cost, rnd = load(d, "scale-in.json"), load(d, "scale-in-random.json")
    if cost and rnd:
        parts.append(scale_in(cost, rnd))
    e = load(d, "scale-in-abrupt.json")
    if e:
        parts.append(at_rate(e, "scale-in-abrupt: the same 40 nodes by cost, vanishing without GoingAway",
                             [("scale_in_p95_s", 1), ("scale_in_gb", 0), ("scale_in_prefetch_gb", 0),
                              ("scale_in_lost", 0)]))
    rule = os.path.join(d, "replication-rule")
    if os.path.isdir(rule):
        t = replication_rule(rule)
        if t:
            parts.append(t)
    for f in sorted(os.listdir(d)):
        if f.startswith("sweep-") and f.endswith(".json"):
            parts.append(sweep(load(d, f)))
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
