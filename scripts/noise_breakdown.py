"""Which quantization points cost a shared reference model its accuracy: logit SNR per group.

Quantizes the reference model as ``results_table.py`` does (draw 0: the fixed list), then
switches on one group of points at a time (``lrpq.noise_breakdown``) on images spread over the dev folder and
prints each group's logit SNR against the same model with every quantizer off, worst first. Groups
are point kinds across blocks (``mlp.fc2.input``, ``attn.matmul1.a`` …) or, with ``--by layer``, each
layer's inputs and weight.

    python scripts/noise_breakdown.py --models ref-B --wbits 6 --abits 6 --images 150
    python scripts/noise_breakdown.py --models ref-B --wbits 4 --abits 4 --by layer --json noise.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from measure import CALIBRATION_IMAGES, REFERENCES

from lrpq import QuantConfig, quantize
from lrpq.api import quantizers
from lrpq.data import draw_calibration_set, evenly_spaced, list_images, load_calibration_images
from lrpq.models import build_model, resolve_model
from lrpq.noise_breakdown import groups_by_kind, groups_by_layer, noise_breakdown
from lrpq.outputs import replace_text


def breakdown(label: str, config: QuantConfig, images: int, by: str) -> dict[str, float]:
    ref = REFERENCES[label]
    spec = resolve_model(str(ref.card))
    calib = load_calibration_images(draw_calibration_set(ref.data / "calib", CALIBRATION_IMAGES, 0), spec.data_config)
    dev = [path for path, _ in evenly_spaced(list_images(ref.data / "dev"), images)]
    torch.manual_seed(0)
    model = quantize(build_model(spec), config, calib)
    groups = groups_by_layer(model) if by == "layer" else groups_by_kind(model)
    dev_images = load_calibration_images(dev, spec.data_config)
    result = noise_breakdown(model, dev_images, {"all": quantizers(model)} | groups, progress=True)
    return {"all": result.pop("all")} | dict(sorted(result.items(), key=lambda item: item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCES), default=["ref-B"])
    parser.add_argument("--wbits", type=int, default=6)
    parser.add_argument("--abits", type=int, default=6)
    parser.add_argument("--no-gptq", action="store_true", help="round weights to the nearest level, not by GPTQ")
    parser.add_argument("--images", type=int, default=150, help="dev images, spread over every class")
    parser.add_argument("--by", choices=("kind", "layer"), default="kind")
    parser.add_argument("--json", type=Path, help="write {model: {group: snr_db}} here")
    args = parser.parse_args()
    config = QuantConfig(args.wbits, args.abits, gptq=not args.no_gptq)
    results = {}
    for label in args.models:
        results[label] = breakdown(label, config, args.images, args.by)
        print(f"{label} W{args.wbits}A{args.abits}{'' if args.no_gptq else ' + GPTQ'}, {args.images} dev images")
        print(f"{'group':<36} {'logit SNR (dB)':>14}")
        for group, db in results[label].items():
            print(f"{group:<36} {db:14.2f}")
    if args.json:
        replace_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
