"""What learning the weights' rounding costs ``--recover``, and whether it changes the model: one run each way.

For each (reference model, width, plan, draw) the cached quantized draw (``recovery_table.py``'s ``--cache``)
is recovered twice from the same copy, with the library's default ``learn`` and with ``rounding`` added,
and the script prints both times, their ratio, how many weight levels the rounding moved and how many
state tensors differ between the two recovered models (none when no level moved: the rounding's
stand-in computes the cached quantized weights exactly).

    python scripts/recovery_rounding_cost.py --threads 2 --cache /work/runs-cache \\
        --runs ref-A:4:fixed:0 ref-A:3:fixed:0 ref-B:4:mixed:0
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from measure import REFERENCES, REPO
from recovery_table import ReferenceModel

from lrpq.models import build_model
from lrpq.recovery import DEFAULT_LEARN, RecoveryConfig, recover


def compare(ref: ReferenceModel, bits: int, plan: str, draw: int) -> dict[str, object]:
    """Both recoveries of one draw: seconds, moved levels, and the state tensors that differ."""
    quantized, teacher, calib = ref.quantized(bits, plan, draw), build_model(ref.spec), ref.calib(draw)
    reports, states = {}, {}
    for label, learn in {"default": DEFAULT_LEARN, "with rounding": ("rounding", *DEFAULT_LEARN)}.items():
        model = copy.deepcopy(quantized)
        reports[label] = recover(model, teacher, calib, RecoveryConfig(learn=learn, seed=draw), progress=False)
        states[label] = model.state_dict()
    default, rounded = states["default"], states["with rounding"]
    differing = [key for key, value in default.items() if not torch.equal(value, rounded[key])]
    return {
        "run": f"{ref.name} W{bits}A{bits} {plan} draw {draw}",
        "seconds": reports["default"].seconds,
        "seconds with rounding": reports["with rounding"].seconds,
        "ratio": round(reports["with rounding"].seconds / reports["default"].seconds, 3),
        "levels moved": reports["with rounding"].changed_levels,
        "differing tensors": len(differing),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["ref-A:4:fixed:0"], help="MODEL:BITS:PLAN:DRAW each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "recovery-table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for run in args.runs:
        name, bits, plan, draw = run.split(":")
        if name not in REFERENCES or plan not in ("fixed", "mixed"):
            raise SystemExit(f"--runs {run!r}: expected MODEL:BITS:PLAN:DRAW, MODEL one of {sorted(REFERENCES)}")
        ref = ReferenceModel(name, REFERENCES[name], args.cache, None)
        print(json.dumps(compare(ref, int(bits), plan, int(draw))), flush=True)


if __name__ == "__main__":
    main()
