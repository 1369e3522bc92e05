"""Measure the ResNet-18 3x3 layer table of bench/README.md: `python bench/run_layers.py [--threads 1 2]`.

Prints the markdown table and writes bench/results-<date>.json (rows + popcount bound + machine info)."""

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnnc.bench import RESNET18_3X3, format_layer_table, popcount_bound, run_layer_bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--out", default=None, help="JSON output path (default bench/results-<date>.json)")
    a = ap.parse_args()
    bound = popcount_bound()
    rows = []
    for t in a.threads:
        rows += run_layer_bench(RESNET18_3X3, threads=t, repeat=a.repeat, bound=bound, verbose=True)
    print()
    print(format_layer_table(rows, bound=bound))
    date = datetime.date.today().isoformat()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"results-{date}.json")
    with open(out, "w") as f:
        json.dump({"date": date, "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                   "bound": bound, "rows": rows}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
