"""Regenerate the committed calibration lists in calib/ from the shared data folders.

The lists pin the exact images behind the README results; they only change if
``lrpq.data.draw_calibration_set`` or the shared data change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrpq.data import draw_calibration_set
from lrpq.outputs import replace_text

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("cifar10", "imagenette")
SPLIT = "calib"
N_IMAGES = 32
SEED = 0


def write_list(data_root: Path, dataset: str, out_dir: Path) -> Path:
    """Draw ``N_IMAGES`` with ``SEED`` from ``<data_root>/<dataset>/calib`` and write them relative to it."""
    folder = data_root / dataset / SPLIT
    paths = draw_calibration_set(folder, N_IMAGES, SEED)
    out_file = out_dir / f"{dataset}_seed{SEED}_n{N_IMAGES}.txt"
    header = f"# draw_calibration_set(<data>/{dataset}/{SPLIT}, n={N_IMAGES}, seed={SEED}); relative paths"
    lines = [header, *(path.relative_to(folder).as_posix() for path in paths)]
    replace_text(out_file, "\n".join(lines) + "\n")
    return out_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out-dir", type=Path, default=REPO / "calib")
    args = parser.parse_args()
    for dataset in DATASETS:
        print(write_list(args.data_root, dataset, args.out_dir))


if __name__ == "__main__":
    main()
