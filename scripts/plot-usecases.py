#!/usr/bin/env python3
"""Plots bytes fetched over time for a streaming use case, one line per pull order, with the
reader's first answer marked. Input: the CSV of `usecases sqlite|media --trace CSV`
(crates/cli/examples/usecases). Usage: scripts/plot-usecases.py TRACE.csv OUT.png"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

trace, out = sys.argv[1], sys.argv[2]
runs = {}
with open(trace) as f:
    for row in csv.DictReader(f):
        run = runs.setdefault(row["order"], {"t": [], "mib": [], "events": {}, "case": row["case"]})
        t, mib = float(row["seconds"]), int(row["bytes"]) / 2**20
        if row["event"]:
            run["events"][row["event"]] = (t, mib)
        else:
            run["t"].append(t)
            run["mib"].append(mib)

fig, ax = plt.subplots(figsize=(7, 4))
for order, run in runs.items():
    (line,) = ax.plot(run["t"], run["mib"], label=f"pull order {order}")
    t, mib = run["events"]["answer"]
    ax.plot([t], [mib], "o", color=line.get_color())
    ax.annotate(f"first answer: {t:.2f} s, {mib:.1f} MiB", (t, mib), textcoords="offset points",
                xytext=(10, 5 if order == "sequential" else -15), color=line.get_color(), fontsize=8)
case = next(iter(runs.values()))["case"]
ax.set_xlabel("seconds since r3map mount started")
ax.set_ylabel("MiB fetched from the remote")
ax.set_title(f"{case}: bytes fetched over a 20 ms, 8 MiB/s link")
ax.legend(loc="lower right")
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out, dpi=110)
