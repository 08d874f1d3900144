#!/usr/bin/env python3
"""Plots the WAN benchmark: reads the `csv,` rows that
`cargo bench -p r3map-mount --bench wan` prints (on stdin) and writes a PNG (argument 1).

Needs matplotlib (pip install matplotlib); used only to regenerate docs/wan.png."""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = []
for line in sys.stdin:
    if line.startswith("csv,"):
        _, rtt, mount, workers, first_ms, read, write, write_sync = line.strip().split(",")
        rows.append((int(rtt), mount, int(workers), float(first_ms), float(read), float(write), float(write_sync)))

fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
series = sorted({(m, w) for _, m, w, *_ in rows})
for column, (ax, title) in enumerate(zip(axes, ["sequential read (MiB/s)", "sequential write (MiB/s)", "first 4 KiB (ms)"])):
    for mount, workers in series:
        points = sorted((r[0], r[4 + column] if column < 2 else r[3]) for r in rows if r[1] == mount and r[2] == workers)
        label = "direct" if mount == "direct" else f"managed, {workers} pull workers"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("round-trip time (ms)")
    ax.set_title(title)
    if column < 2:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
axes[0].legend(fontsize=8)
fig.suptitle("r3map over the delay proxy: direct vs managed mounts")
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
