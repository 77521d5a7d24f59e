"""The results of the README and docs/results.md: fixed bits against every allocator, both reference models.

Every row is measured on calibration draws 0, 1, 2 (``scripts/measure.py``: 32 calibration images
drawn with that seed, the whole dev folder, per-image correctness kept), so each mixed row's gap to its
fixed twin and to float is averaged over draws with a paired 95 % interval. Mixed rows use the same
targets as their fixed twin under the allocator's default budget (``bops``: no more bit-operations
and no bigger than fixed bits; the paper rule: the layer mean). Writes ``results/<model>.json``,
``docs/results.md`` (every row), the README table (``docs/readme_table.md``, pasted into the README)
and ``docs/accuracy_vs_bits.png`` (top-1 against parameter-weighted weight bits).

    python scripts/results_table.py                      # both models, every row, draws 0–2
    python scripts/results_table.py --models ref-B --targets W4A4 --rerun "W4A4 mixed, relevance"
    python scripts/results_table.py --adopt-sweeps --stored-only   # tables from stored rows and sweeps
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from measure import REFERENCES, REPO, Row, adopt, correctness, gap_cell, is_stored, measured_draws, resolved, run_rows

from lrpq.allocation.plans import ALLOCATORS, DEFAULT_ALLOCATOR, default_budget
from lrpq.outputs import replace_text

TARGETS = {"W6A6": (6, 6), "W4A4": (4, 4), "W3A4": (3, 4), "W3A3": (3, 3)}
DRAWS = [0, 1, 2]
FLOAT = Row("float", None)


def rows_for(target: str, allocators: Sequence[str] = ALLOCATORS) -> list[Row]:
    """The fixed-bit row of ``target`` and its mixed twin by each of ``allocators``."""
    bits = TARGETS[target]
    mixed = [
        Row(f"{target} mixed, {a}", bits, {"mixed": {"allocator": a, "budget": default_budget(a)}}) for a in allocators
    ]
    return [Row(f"{target} fixed", bits), *mixed]


def current_rows(stored: dict[str, dict], rows: Sequence[Row], draws: Sequence[int]) -> dict[str, dict]:
    """The stored results measured with their row's current setting (at any thread count, on the whole dev
    folder), so a table never shows a row measured under an older default or a sweep's other setting."""
    kept = {}
    for row in rows:
        for draw in draws:
            key = f"{row.label}@{draw}"
            threads = stored[key]["setting"]["threads"] if key in stored else None
            if is_stored(stored, key, resolved(row.setting(draw, None, threads))):
                kept[key] = stored[key]
    return kept


def _mean_top1(stored: dict, label: str) -> float | None:
    draws = measured_draws(stored, label, DRAWS)
    return None if not draws else float(100 * correctness(stored, label, draws).mean())


def _mean_cost(stored: dict, label: str, key: str) -> float | None:
    values = [stored[f"{label}@{d}"]["cost"].get(key) for d in measured_draws(stored, label, DRAWS)]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def full_table(results: dict[str, dict], targets: list[str]) -> str:
    """docs/results.md: every row of every model, mean over draws, gaps to fixed and float, costs vs fixed."""
    parts = []
    for name, stored in results.items():
        lines = [
            f"### {REFERENCES[name].label}\n",
            "| row | " + " | ".join(f"draw {d}" for d in DRAWS) + " | mean | − fixed | − float | size, BOPs vs fixed |",
            "|---|" + "---:|" * (len(DRAWS) + 4),
        ]
        for row in [FLOAT] + [row for target in targets for row in rows_for(target)]:
            have = measured_draws(stored, row.label, DRAWS)
            if not have:
                continue
            cells = [f"{stored[f'{row.label}@{d}']['top1']:.2f}" if d in have else "–" for d in DRAWS]
            cells.append(f"{_mean_top1(stored, row.label):.2f}")
            fixed = row.label.split(" ")[0] + " fixed"
            is_mixed = "mixed" in row.label
            cells.append(gap_cell(stored, row.label, fixed, DRAWS) if is_mixed else "")
            cells.append(gap_cell(stored, row.label, "float", DRAWS) if row is not FLOAT else "")
            size, bops = _mean_cost(stored, row.label, "size_vs_fixed"), _mean_cost(stored, row.label, "bops_vs_fixed")
            cells.append(f"{size:.3f}, {bops:.3f}" if size is not None else "")
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def readme_table(results: dict[str, dict], targets: list[str]) -> str:
    """The README's table: per target, fixed bits and the default ``--mixed``, mean top-1 over draws 0–2."""
    names = list(results)
    head = (
        "| | "
        + " | ".join(
            f"{REFERENCES[n].label.split(' ')[0]} fixed | {REFERENCES[n].label.split(' ')[0]} --mixed | gain (95% CI)"
            for n in names
        )
        + " |"
    )
    lines = [head, "|---|" + "---:|---:|---:|" * len(names)]
    cells = []
    for name in names:
        top1 = _mean_top1(results[name], "float")
        cells += [f"{top1:.2f}" if top1 is not None else "–", "", ""]
    lines.append("| float | " + " | ".join(cells) + " |")
    for target in targets:
        cells = []
        mixed = f"{target} mixed, {DEFAULT_ALLOCATOR}"
        for name in names:
            fixed, default = _mean_top1(results[name], f"{target} fixed"), _mean_top1(results[name], mixed)
            cells.append(f"{fixed:.2f}" if fixed is not None else "–")
            cells.append(f"{default:.2f}" if default is not None else "–")
            cells.append(gap_cell(results[name], mixed, f"{target} fixed", DRAWS))
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], targets: list[str], path: Path) -> None:
    """Top-1 against parameter-weighted weight bits: fixed bits as a line, each allocator as points."""
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    markers = dict(zip(ALLOCATORS, "sD^o", strict=True))
    for axis, (name, stored) in zip(axes[0], results.items(), strict=True):
        float_top1 = _mean_top1(stored, "float")
        if float_top1 is not None:
            axis.axhline(float_top1, color="gray", linestyle=":", label="float")
        fixed = [
            (_mean_cost(stored, f"{t} fixed", "param_weighted_wbits"), _mean_top1(stored, f"{t} fixed"), t)
            for t in targets
        ]
        fixed = sorted((x, y, t) for x, y, t in fixed if x is not None and y is not None)
        axis.plot([x for x, _, _ in fixed], [y for _, y, _ in fixed], "k-o", label="fixed bits")
        for x, y, t in fixed:
            axis.annotate(t, (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
        for allocator in ALLOCATORS:
            points = []
            for target in targets:
                label = f"{target} mixed, {allocator}"
                top1, bits = _mean_top1(stored, label), _mean_cost(stored, label, "param_weighted_wbits")
                if top1 is not None and bits is not None:
                    points.append((bits, top1))
            if points:
                style = dict(markersize=8, linestyle="none", label=f"mixed: {allocator}")
                axis.plot(*zip(*points, strict=True), markers[allocator], **style)
        axis.set(title=REFERENCES[name].label, xlabel="weight bits per parameter", ylabel="top-1 (%), mean of 3 draws")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCES), default=sorted(REFERENCES))
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--draws", type=int, nargs="+", default=DRAWS)
    parser.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS), help="mixed rows")
    parser.add_argument("--rerun", nargs="*", default=[], help="row labels to measure again even if stored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument(
        "--adopt-sweeps",
        action="store_true",
        help="first take every row a sweep in RESULTS/sweeps measured with the same setting (scripts/sweep.py)",
    )
    parser.add_argument("--stored-only", action="store_true", help="measure nothing: tables from what is stored")
    args = parser.parse_args()
    for name in args.models:
        rows = [FLOAT] + [row for target in args.targets for row in rows_for(target, args.allocators)]
        path = args.results / f"{name}.json"
        if args.adopt_sweeps:
            stored = json.loads(path.read_text()) if path.is_file() else {}
            sweeps = sorted((args.results / "sweeps").glob(f"*-{name.replace('-', '')}-*.json"))
            adopted = adopt(stored, rows, args.draws, sweeps, limit=None, threads=args.threads)
            replace_text(path, json.dumps(stored, indent=1) + "\n")
            print(f"{name}: adopted {len(adopted)} measurements from {len(sweeps)} sweeps")
        if args.stored_only:
            continue
        run_rows(
            REFERENCES[name],
            rows,
            args.draws,
            path,
            limit=None,
            threads=args.threads,
            rerun=set(args.rerun),
        )
    stored = {name: args.results / f"{name}.json" for name in REFERENCES}
    targets = list(TARGETS)
    every_row = [FLOAT] + [row for target in targets for row in rows_for(target)]
    results = {
        name: current_rows(json.loads(path.read_text()), every_row, DRAWS)
        for name, path in stored.items()
        if path.is_file()
    }
    replace_text(
        REPO / "docs/results.md",
        "# Results: fixed bits and every allocator, calibration draws 0–2\n\n"
        "`python scripts/results_table.py` (see its docstring and `scripts/measure.py` for how each cell is "
        "measured). Gaps are mean top-1 differences in points over the draws, with paired 95 % intervals "
        "over images; size and BOPs are the mixed plan's over the fixed plan's (mean over draws).\n\n"
        + full_table(results, targets),
    )
    replace_text(REPO / "docs/readme_table.md", readme_table(results, targets))
    plot(results, targets, REPO / "docs/accuracy_vs_bits.png")
    print(readme_table(results, targets))


if __name__ == "__main__":
    main()
