"""How much a reference model's rows move with the calibration draw, and their gaps averaged over draws.

The README table calibrates on one fixed 32-image list per model. On ref-B's 600 dev images, changes
that leave the float function alone move a row by about a point, so a single draw cannot place a
mixed row within half a point of float or of its fixed twin. This reads the rows measured with other
draws (``results_table.py --calib-seed S --seed S --out results/calib-seeds/seedS``) beside the
fixed-list ones (``results/<model>.json``, drawn with seed 0), and reports per row its top-1 for every
draw, the mean, and the mean gap to float and to its fixed-bit twin with a paired 95 % interval.

The interval is over images: each image's correctness is averaged over the draws, and the gap is the
mean per-image difference ± 1.96 standard errors. With one draw it is ``lrpq.evaluate.PairedGap``'s
interval; with more it is the interval of the gap expected over calibration draws on these images.

    python scripts/calibration_spread.py --models ref-B
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from results_table import FIXED_TWIN, REFERENCES, REPO, ROWS, is_current, unpack_row

from lrpq.evaluate import Z_95

FIXED_LIST_SEED = 0  # calib/*_seed0_n32.txt: draw_calibration_set(calib folder, 32, seed=0)


def load_draws(name: str, results: Path, runs: Path) -> dict[int, dict]:
    """Rows per calibration seed: the fixed list as seed 0, then every ``runs/seed*/<name>.json``."""
    draws = {FIXED_LIST_SEED: json.loads((results / f"{name}.json").read_text())}
    for path in sorted(runs.glob(f"seed*/{name}.json")):
        rows = json.loads(path.read_text())
        seeds = {row["setting"].get("calib_seed") for row in rows.values()}
        if len(seeds) != 1 or None in seeds:
            raise SystemExit(f"{path}: rows from several or no calibration seeds ({sorted(map(str, seeds))})")
        draws[seeds.pop()] = rows
    return draws


def _is_current(row: dict, label: str) -> bool:
    """Whether a stored row was measured with its label's current setting, on its own draw and images.

    Rows kept from before a default changed (e.g. ``rotate_hidden``) measure another method, and
    averaging them with current ones would mix the two.
    """
    stored = row.get("setting") or {}
    return is_current(row, label, stored.get("limit"), stored.get("relevance_images"), stored.get("calib_seed"))


def _measured_in(draws: dict[int, dict], label: str) -> list[int]:
    """The draws that hold a row with its per-image correctness, measured with the row's current setting."""
    return [
        seed
        for seed in sorted(draws)
        if "correct" in draws[seed].get(label, {}) and _is_current(draws[seed][label], label)
    ]


def _correct(draws: dict[int, dict], label: str, seeds: list[int]) -> np.ndarray | None:
    """(draws, images) per-image correctness of a row on ``seeds``, or None if one of them lacks it
    or was measured with another setting than the row's current one."""
    rows = [draws[seed].get(label) for seed in seeds]
    if any(row is None or "correct" not in row or not _is_current(row, label) for row in rows):
        return None
    if len({row["n"] for row in rows}) != 1:
        return None
    return np.array([unpack_row(row).correct for row in rows], dtype=float)


def mean_gap(model: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """Mean top-1 gap in points over draws, with its paired 95 % interval over images."""
    per_image = model.mean(0) - reference.mean(0)
    half = Z_95 * per_image.std() / math.sqrt(per_image.size)
    return 100 * per_image.mean(), 100 * (per_image.mean() - half), 100 * (per_image.mean() + half)


def _gap_cell(gap: tuple[float, float, float] | None) -> str:
    return "–" if gap is None else f"{gap[0]:+.2f} ({gap[1]:+.2f} … {gap[2]:+.2f})"


def spread_markdown(name: str, draws: dict[int, dict]) -> str:
    """One line per row measured with two draws or more (the others are the README table's): top-1 per
    draw, mean, and mean gaps to float and to the fixed twin over the draws the row has."""
    seeds = sorted(draws)
    lines = [
        f"{REFERENCES[name].label}, calibration draws {', '.join(map(str, seeds))} (seed 0: the fixed list; "
        "a row's mean and gaps are over the draws it was measured with)\n",
        "| row | " + " | ".join(f"draw {seed}" for seed in seeds) + " | mean | − float | − fixed twin |",
        "|---|" + "---:|" * (len(seeds) + 3),
    ]
    for label, _, _ in ROWS:
        measured = _measured_in(draws, label)
        if len(measured) < 2:
            continue
        correct = _correct(draws, label, measured)
        float_correct = _correct(draws, "float", measured)
        twin = _correct(draws, FIXED_TWIN[label], measured) if label in FIXED_TWIN else None
        cells = [f"{draws[seed][label]['top1']:.2f}" if seed in measured else "–" for seed in seeds]
        cells.append(f"{100 * correct.mean():.2f}")
        cells.append(_gap_cell(mean_gap(correct, float_correct) if float_correct is not None else None))
        cells.append(_gap_cell(mean_gap(correct, twin) if twin is not None else None))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCES), default=["ref-B"])
    parser.add_argument("--results", type=Path, default=REPO / "results", help="the fixed-list rows")
    parser.add_argument("--runs", type=Path, default=REPO / "results/calib-seeds", help="seed*/<model>.json")
    args = parser.parse_args()
    text = "\n".join(spread_markdown(name, load_draws(name, args.results, args.runs)) for name in args.models)
    (args.runs / "spread.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
