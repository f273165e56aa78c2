#!/usr/bin/env python3
"""An optimistic bound on how soon any policy can absorb a surge when every
copy comes from the origin at the node's own bandwidth (the simulator's
model: no peer-to-peer copies). Standard library only.

Fleet as in S1: 200 nodes, bandwidth lognormal (median 200 Mbit/s, sigma
0.9), GPU classes 40/30/30% at 2/3.5/7 s (SD1.5) or 6/10/18 s (SDXL) per
image, load 1.5 s + size / 1.5 GB/s. The other 70% of the reference load
(14 jobs/s, about 84 GPUs busy) stays where it is, so at most 116 nodes turn
to the surge model (140 at 14.2 jobs/s). Every chosen node starts its download at the surge's
first second and then does nothing but the surge model. The surge model
takes 30% of 20 jobs/s. The bound is the first time T at which the jobs
those nodes can have finished catch up with the jobs arrived (the backlog
is gone; per-minute p95 can only be low after that). Mean over 200 draws
of the fleet's bandwidths.
Usage: python3 docs/sim/surge_bound.py
"""
import math
import random


def catch_up_s(size_gb, rate=6.0, free_nodes=116, draws=200):
    out = []
    rng = random.Random(14)
    speeds = (6.0, 10.0, 18.0) if size_gb > 5 else (2.0, 3.5, 7.0)
    for _ in range(draws):
        nodes = []
        for i in range(200):
            bw = 25e6 * math.exp(0.9 * rng.gauss(0, 1))
            x = (i + 0.5) / 200
            g = speeds[0 if x < 0.4 else (1 if x < 0.7 else 2)]
            ready = size_gb * 1e9 / bw + 1.5 + size_gb / 1.5
            nodes.append((ready, g))
        t = 1.0
        while True:
            done = sorted((max(0.0, t - r) / g for r, g in nodes), reverse=True)
            if sum(done[:free_nodes]) >= rate * t:
                out.append(t)
                break
            t += 1.0
    return sum(out) / len(out)


if __name__ == "__main__":
    # At 20 jobs/s (6 for the surge model, 14 x 6 s = 84 GPUs busy with the
    # rest) and at 14.2 (4.26; 9.94 x 6 s = 60 busy).
    for total, free in ((20.0, 116), (14.2, 140)):
        for gb in (2.13, 6.94):
            t = catch_up_s(gb, rate=0.3 * total, free_nodes=free)
            print(f"{total} jobs/s, {gb} GB: backlog gone at the earliest {t / 60:.1f} min after the surge starts")
