"""The first-order layer noise estimate against the exact one-layer-at-a-time measurement, on a reference model.

Both see the same calibration draw (the estimate's grids and gradients, the measurement's logits come
from the first ``--images`` images). Reports how alike the two are (Kendall's τ over every layer, kind and
width; the estimate/measurement ratio), how alike the plans they give are (share of layers given the
same widths, BOPs budget), and what each cost in seconds.

    python scripts/noise_estimate_check.py --model ref-A
    python scripts/noise_estimate_check.py --model ref-B --json results/noise_estimate_check-ref-B.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from measure import CALIBRATION_IMAGES, REFERENCES

from lrpq.allocation.budget import layer_costs
from lrpq.allocation.from_relevance import widths_for
from lrpq.allocation.noise_estimate import estimate_layer_noise
from lrpq.allocation.noise_measurement import measure_layer_noise
from lrpq.allocation.plans import plan_widths
from lrpq.config import QuantConfig
from lrpq.data import draw_calibration_set, load_calibration_images
from lrpq.models import build_model, resolve_model
from lrpq.outputs import replace_text
from lrpq.ranking import kendall_tau


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCES), required=True)
    parser.add_argument("--bits", type=int, default=4, help="target width (default 4: widths 3–6)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--draw", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = REFERENCES[args.model]
    spec = resolve_model(str(ref.card))
    calib = load_calibration_images(
        draw_calibration_set(ref.data / "calib", CALIBRATION_IMAGES, args.draw), spec.data_config
    )
    model, config = build_model(spec), QuantConfig(args.bits, args.bits)
    widths = widths_for(args.bits, args.bits)
    timed = {}
    for name, measure in (("exact", measure_layer_noise), ("estimate", estimate_layer_noise)):
        started = time.perf_counter()
        timed[name] = measure(model, config, calib, widths, images=args.images)
        timed[f"{name}_seconds"] = time.perf_counter() - started
    exact, estimate = timed["exact"], timed["estimate"]
    keys = [(n, k, b) for n, kinds in exact.noise.items() for k, curve in kinds.items() for b in curve]
    measured = np.array([exact.noise[n][k][b] for n, k, b in keys])
    estimated = np.array([estimate.noise[n][k][b] for n, k, b in keys])
    log_ratio = np.log10(estimated / measured)
    costs = layer_costs(model, tuple(calib.shape[1:]))
    plans = {
        name: plan_widths(
            noise.curves("weight"), noise.curves("inputs"), (args.bits, args.bits), "bops", costs, noise.pinned_abits
        )
        for name, noise in (("exact", exact), ("estimate", estimate))
    }
    same = np.mean([plans["exact"].layers[n] == plans["estimate"].layers[n] for n in plans["exact"].layers])
    report = {
        "model": args.model,
        "bits": args.bits,
        "images": args.images,
        "kendall_tau": round(kendall_tau(measured, estimated), 4),
        "median_ratio": round(float(10 ** np.median(log_ratio)), 4),
        "ratio_10_90": [round(float(10**q), 4) for q in np.percentile(log_ratio, [10, 90])],
        "plans_same_widths": round(float(same), 4),
        "exact_seconds": round(timed["exact_seconds"], 1),
        "estimate_seconds": round(timed["estimate_seconds"], 1),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        replace_text(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
