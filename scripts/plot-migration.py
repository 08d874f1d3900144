#!/usr/bin/env python3
"""Plots the migration benchmark: reads the `csv,` rows that
`cargo bench -p r3map-cli --bench migration` prints (on stdin) and writes a PNG (argument 1).

Needs matplotlib (pip install matplotlib); used only to regenerate docs/migration.png."""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = []
for line in sys.stdin:
    if line.startswith("csv,"):
        _, rtt, permille, mode, downtime_ms, total_s, dirty = line.strip().split(",")
        rows.append((int(rtt), int(permille), mode, float(downtime_ms), float(total_s), int(dirty)))

rtts = sorted({r[0] for r in rows})
hot = sorted({r[1] for r in rows if r[2] != "stop-and-copy"})
fig, axes = plt.subplots(1, len(rtts), figsize=(6 * len(rtts), 4.5), squeeze=False)
for ax, rtt in zip(axes[0], rtts):
    stop = [r[3] for r in rows if r[0] == rtt and r[2] == "stop-and-copy"]
    width = 0.35
    for i, mode in enumerate(["single round", "pre-copy"]):
        values = [next((r[3] for r in rows if r[0] == rtt and r[1] == p and r[2] == mode), 0) for p in hot]
        ax.bar([x + (i - 0.5) * width for x in range(len(hot))], values, width, label=mode)
    if stop:
        ax.axhline(stop[0], color="red", linestyle="--", label=f"stop-and-copy ({stop[0]:.0f} ms)")
    ax.set_xticks(range(len(hot)), [f"{p / 10:g}% hot" for p in hot])
    ax.set_yscale("log")
    ax.set_ylabel("downtime (ms, log scale)")
    ax.set_title(f"RTT {rtt} ms")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
