"""Choose a default by measurement: named variants × calibration draws on a reference model's dev folder.

Prints (and writes beside ``--out`` as markdown) every variant's top-1 per draw, its mean, its gap to
the first variant averaged over the draws with a paired 95 % interval over images, and for mixed
plans their size and BOPs against fixed bits (``scripts/measure.py`` says how).

    python scripts/sweep.py --model ref-B --wbits 4 --abits 4 --draws 0 1 2 --out results/sweeps/crl-k.json \
        --variant "k=inf" '{"clip_k": null}' --variant "k=1" '{"clip_k": 1.0}' --variant "k=2" '{"clip_k": 2.0}'

A variant is a JSON object of ``QuantConfig`` fields, plus optionally ``"mixed": {"allocator": ...,
"budget": ...}`` (keywords of ``lrpq.allocation.plans.mixed_plan``) for a mixed plan at the target's
mean bits; relevance scores and layer noise are computed once per draw and shared by the variants.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from measure import REFERENCES, Row, correctness, gap_cell, measured_draws, run_rows

from lrpq.outputs import replace_text


def summary(stored: dict[str, dict], rows: list[Row], draws: list[int]) -> str:
    """Markdown: top-1 per draw, mean, gap to the first row, and a mixed plan's size and BOPs vs fixed."""
    lines = [
        "| variant | "
        + " | ".join(f"draw {d}" for d in draws)
        + f" | mean | − {rows[0].label} | size, BOPs vs fixed |",
        "|---|" + "---:|" * (len(draws) + 3),
    ]
    for row in rows:
        have = measured_draws(stored, row.label, draws)
        if not have:
            continue
        cells = [f"{stored[f'{row.label}@{d}']['top1']:.2f}" if d in have else "–" for d in draws]
        cells.append(f"{100 * correctness(stored, row.label, have).mean():.2f}")
        cells.append("" if row is rows[0] else gap_cell(stored, row.label, rows[0].label, draws))
        costs = [stored[f"{row.label}@{d}"].get("cost") or {} for d in have]
        size = [c["size_vs_fixed"] for c in costs if c]
        bops = [c["bops_vs_fixed"] for c in costs if c]
        cells.append(f"{np.mean(size):.3f}, {np.mean(bops):.3f}" if size else "")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCES), required=True)
    parser.add_argument("--wbits", type=float, required=True)
    parser.add_argument("--abits", type=float, required=True)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds (0: the fixed list)")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    parser.add_argument("--limit", type=int, help="an evenly spaced subset of the dev folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rerun", nargs="*", default=[], help="variants to measure again even if stored")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [Row(name, (args.wbits, args.abits), json.loads(text)) for name, text in args.variant]
    ref = REFERENCES[args.model]
    stored = run_rows(ref, rows, args.draws, args.out, limit=args.limit, threads=args.threads, rerun=set(args.rerun))
    table = summary(stored, rows, args.draws)
    replace_text(args.out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
