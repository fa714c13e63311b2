#!/usr/bin/env python3
"""The one results table of the bench scripts.

Reads the tab-separated file that bench/lib.sh's `record` appends to (METRIC, MODE, VALUE per
line; lines starting with # are comments) and prints, per metric and mode, the number of runs
and min / median / max, and on each numerator's row the ratios of medians asked for with
--ratio (e.g. --ratio vipgate/kernel: vipgate's median over nftables'). Metrics and modes keep
the order in which they first appear in the file. A VALUE that is not a number (a measurement
that failed or timed out) is counted in the "failed" column, not in the figures.

Usage: summarize.py RESULTS.tsv [--title TEXT] [--ratio NUM/DEN]...
"""

import argparse
import statistics
import sys


def fmt(v, whole):
    return f"{v:.0f}" if whole or abs(v) >= 100 else f"{v:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--title", default="")
    ap.add_argument("--ratio", action="append", default=[], metavar="NUM/DEN",
                    help="print median(NUM) / median(DEN) on NUM's row; repeatable")
    args = ap.parse_args()
    ratios = []
    for r in args.ratio:
        num, sep, den = r.partition("/")
        if not sep or not num or not den:
            ap.error(f"--ratio {r!r} is not NUM/DEN")
        ratios.append((num, den))

    values, failed, metrics, modes = {}, {}, [], []
    with open(args.results) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                sys.exit(f"{args.results}:{n}: not METRIC<TAB>MODE<TAB>VALUE: {line!r}")
            metric, mode, value = parts
            if metric not in metrics:
                metrics.append(metric)
            if mode not in modes:
                modes.append(mode)
            key = (metric, mode)
            values.setdefault(key, [])
            failed.setdefault(key, 0)
            try:
                values[key].append(float(value))
            except ValueError:
                failed[key] += 1

    if args.title:
        print(args.title)
    if not metrics:
        print("(no results: check ONLY and MODES)")
        return
    mw = max(len("metric"), *map(len, metrics))
    dw = max(len("mode"), *map(len, modes))
    print(f"{'metric':<{mw}}  {'mode':<{dw}}  {'runs':>4}  {'failed':>6}  "
          f"{'min':>9}  {'median':>9}  {'max':>9}  ratio of medians")
    for metric in metrics:
        medians = {m: statistics.median(v) for (k, m), v in values.items() if k == metric and v}
        for mode in modes:
            key = (metric, mode)
            if key not in values:
                continue
            v = values[key]
            whole = all(x.is_integer() for x in v)   # counts stay counts
            figures = "  ".join(f"{fmt(f(v), whole):>9}" for f in (min, statistics.median, max)
                                ) if v else f"{'-':>9}  {'-':>9}  {'-':>9}"
            shown = [f"{medians[mode] / medians[den]:.2f}x {den}"
                     for num, den in ratios
                     if num == mode and mode in medians and medians.get(den)]
            print(f"{metric:<{mw}}  {mode:<{dw}}  {len(v):>4}  {failed[key]:>6}  {figures}  "
                  f"{', '.join(shown)}".rstrip())


if __name__ == "__main__":
    main()
