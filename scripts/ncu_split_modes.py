#!/usr/bin/env python3
"""Per-kernel medians of `ncu --csv` output of `asynctls bench offload`, split at the
first residency kernel: the GPU-resident mode before it, the offloaded modes after.

Usage: python3 scripts/ncu_split_modes.py raw.csv
"""
import csv, statistics, sys
from collections import defaultdict
rows=[l for l in open(sys.argv[1]) if l.startswith('"')]
seq=[]
for r in csv.DictReader(rows):
    if r.get("Metric Name")!="gpu__time_duration.sum": continue
    v=float(r["Metric Value"].replace(",","")); u=r.get("Metric Unit","")
    v*= {"nsecond":1e-3,"ns":1e-3,"usecond":1,"us":1,"msecond":1e3,"ms":1e3}.get(u,1)
    seq.append((r["Kernel Name"].split("(")[0], v))
first=next((i for i,(n,_) in enumerate(seq) if n.startswith("residency")), len(seq))
for label, part in (("resident", seq[:first]), ("offloaded", seq[first:])):
    t=defaultdict(list)
    for n,v in part: t[n].append(v)
    print("==", label)
    for n,ts in sorted(t.items(), key=lambda kv:-sum(kv[1])):
        print(f"{n:36s} n={len(ts):4d} median {statistics.median(ts):8.2f} us min {min(ts):8.2f} max {max(ts):8.2f}")
