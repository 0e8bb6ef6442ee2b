"""Differences between selectors in a bench_quality.py results file, with their standard errors.

For each case and ratio: the mean top-1 of selector A and of selector B over the training seeds, their difference,
the standard error of that difference (sqrt(sA^2/nA + sB^2/nB), sample standard deviations over seeds) and the
difference in standard errors; and the difference in kept injected rows (one selection per case, no spread).
A difference under one standard error is not resolved by these seeds.

    python recipes/benchmarks/quality_verdicts.py /tmp/quality/work/results.json --pairs exact_forced:sas_zero_shot \\
        exact:random
"""

from __future__ import annotations

import argparse
import json
import math


def compare(rows: list[dict], first: str, second: str) -> list[dict]:
    by_key = {(r["case"], r["selector"], r["ratio"]): r for r in rows}
    out = []
    for (case, selector, ratio), a in sorted(by_key.items()):
        b = by_key.get((case, second, ratio))
        if selector != first or b is None or not a["top1_runs"] or not b["top1_runs"]:
            continue
        runs_a, runs_b = a["top1_runs"], b["top1_runs"]
        mean_a, mean_b = sum(runs_a) / len(runs_a), sum(runs_b) / len(runs_b)
        variance = sum(_var(runs) / len(runs) for runs in (runs_a, runs_b))
        se = math.sqrt(variance) if variance > 0 else float("nan")
        out.append(
            {
                "case": case,
                "ratio": ratio,
                f"{first} top-1": round(100 * mean_a, 2),
                f"{second} top-1": round(100 * mean_b, 2),
                "difference (points)": round(100 * (mean_a - mean_b), 2),
                "SE (points)": round(100 * se, 2),
                "difference / SE": round((mean_a - mean_b) / se, 2) if se == se else float("nan"),
                "seeds": f"{len(runs_a)}/{len(runs_b)}",
                "kept noise difference (points)": round(100 * (a["noisy_kept"] - b["noisy_kept"]), 2),
            }
        )
    return out


def _var(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files written by bench_quality.py")
    parser.add_argument("--pairs", nargs="+", required=True, help="A:B selector pairs, e.g. exact:random")
    args = parser.parse_args()
    rows = [row for path in args.results for row in json.load(open(path))["rows"]]
    for pair in args.pairs:
        first, second = pair.split(":")
        table = compare(rows, first, second)
        print(f"\n{first} against {second}")
        if not table:
            print("(no case has both)")
            continue
        print("| " + " | ".join(table[0]) + " |")
        print("|" + "---|" * len(table[0]))
        for row in table:
            print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
