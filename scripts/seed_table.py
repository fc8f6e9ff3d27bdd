"""Mean ± standard deviation over seeds, and paired differences, from `deit eval --json` files.

One group per recipe variant, written ``LABEL=FILE[,FILE...]``; a group's files are its
seeds, in the same order in every group, so the n-th files of two groups form a pair::

    python scripts/seed_table.py \\
        none=evals/none_s0.json,evals/none_s1.json,evals/none_s2.json \\
        soft=evals/soft_s0.json,evals/soft_s1.json,evals/soft_s2.json \\
        hard=evals/hard_s0.json,evals/hard_s1.json,evals/hard_s2.json

prints a Markdown table (top-1 of the averaged heads, cls head, distillation head and teacher
agreement, in %) and, for every two groups, their per-seed differences with the mean
difference's 95% confidence interval (Student's t over the pairs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = (
    ("top1", "avg of heads"),
    ("cls_top1", "cls head"),
    ("dist_top1", "dist head"),
    ("agreement", "agreement with teacher"),
)

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard table values);
# past 30 the normal quantile is close enough for a results page.
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def read_group(spec: str) -> tuple[str, list[dict]]:
    """``LABEL=FILE,FILE`` → the label and the parsed `deit eval --json` objects."""
    label, sep, files = spec.partition("=")
    if not sep or not label or not files:
        raise ValueError(f"{spec!r}: expected LABEL=FILE[,FILE...]")
    runs = []
    for name in files.split(","):
        try:
            runs.append(json.loads(Path(name).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{name}: not a readable `deit eval --json` file ({e})") from e
    return label, runs


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` in %, or the single value."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def confidence_interval(diffs: list[float]) -> tuple[float, float]:
    """95% confidence interval of the mean of paired differences (needs two or more pairs)."""
    dof = len(diffs) - 1
    quantile = T_95[dof - 1] if dof <= len(T_95) else 1.960
    half = quantile * statistics.stdev(diffs) / len(diffs) ** 0.5
    mean = statistics.mean(diffs)
    return mean - half, mean + half


def table(groups: list[tuple[str, list[dict]]]) -> str:
    """The Markdown summary: one row per group, then the paired differences."""
    lines = [
        "| variant | seeds | " + " | ".join(title for _, title in METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    for label, runs in groups:
        cells = []
        for key, _ in METRICS:
            values = [r[key] for r in runs if r.get(key) is not None]
            cells.append(mean_std(values) if values else "—")
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    if len(groups) > 1:
        lines.append("")
    for i, (base_label, base) in enumerate(groups):
        for label, runs in groups[i + 1 :]:
            if len(runs) != len(base):
                raise ValueError(f"{label} has {len(runs)} seeds, {base_label} {len(base)}")
            diffs = [100 * (r["top1"] - b["top1"]) for r, b in zip(runs, base, strict=True)]
            wins = sum(d > 0 for d in diffs)
            summary = f"mean {statistics.mean(diffs):+.2f}"
            if len(diffs) > 1:
                low, high = confidence_interval(diffs)
                summary += f" (95% CI {low:+.2f} to {high:+.2f})"
            lines.append(
                f"- {label} − {base_label} (avg of heads, per seed): "
                + ", ".join(f"{d:+.2f}" for d in diffs)
                + f"; {summary}, ahead in {wins} of {len(diffs)}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", metavar="LABEL=FILE[,FILE...]")
    args = parser.parse_args(argv)
    try:
        print(table([read_group(spec) for spec in args.groups]))
    except (ValueError, KeyError) as e:
        print(f"seed_table: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
