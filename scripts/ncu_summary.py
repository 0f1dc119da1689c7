#!/usr/bin/env python3
"""Median gpu__time_duration per kernel name from `ncu --csv` output.

Usage: ncu --csv --clock-control none --metrics gpu__time_duration.sum CMD > raw.csv
       python3 scripts/ncu_summary.py raw.csv
"""
import csv
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    times = defaultdict(list)
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "")
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1.0)
        name = row["Kernel Name"].split("(")[0]
        times[name].append(value * scale)
    total = sum(sum(ts) for ts in times.values())
    for name, ts in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:40s} n={len(ts):5d} median {statistics.median(ts):8.2f} us  min {min(ts):8.2f}"
              f"  sum {sum(ts):10.1f} us ({100 * sum(ts) / total:4.1f}%)")
    print(f"total {total:.1f} us over {sum(len(ts) for ts in times.values())} kernels")


if __name__ == "__main__":
    main(sys.argv[1])
