"""Measurement only: does a recovery setting under- or over-fit the 32 calibration images?

For one cached ref-B W4A4 ``--mixed`` draw (input-weighted ranges, as ``recovery_table.py --quant "input-weighted
weight ranges" …`` caches it), before and after one recovery: ``nmse`` against the float model on the
calibration images, on one augmented view of each, and on every tenth dev image (60), and the logits' KL
divergence from the float model's on calibration and dev images. A continuous score on held-out images, far
less chaotic than top-1 (docs/recovery.md). ``--cls-weight W`` adds W × the same ``nmse`` on the class token alone.

    python scripts/probe_recovery_fit.py --draw 0 --variant '{"steps": 100}'
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lrpq.distill import DistillFeatures, FeatureShapes, build_loss, extract_features
from lrpq.distill.token_losses import ChannelNormalisedMSE, channel_normalised_mse
from lrpq.models import build_model
from lrpq.recovery import RecoveryConfig, recover
from lrpq.recovery.augment import augment
from lrpq.runs import load_run

sys.path.insert(0, str(Path(__file__).parent))
from measure import REFERENCES, Measurer


class ClassTokenWeightedNMSE(ChannelNormalisedMSE):
    """``nmse`` plus ``weight`` × ``nmse`` of the class token alone (the token ref-B's head reads)."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        pairs = self.block_pairs(student, teacher)
        token = sum(channel_normalised_mse(s[:, :1], t[:, :1]) for s, t in pairs) / len(pairs)
        return super().forward(student, teacher) + self.weight * token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draw", type=int, default=0)
    parser.add_argument("--variant", default="{}", help="RecoveryConfig fields; a 'seed' is added to the draw's")
    parser.add_argument("--cls-weight", type=float, default=0.0)
    parser.add_argument("--cache", type=Path, default=Path("/work/runs-cache"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    fields = json.loads(args.variant)
    measurer = Measurer(REFERENCES["ref-B"], None, 2)
    quantized, spec = load_run(args.cache / f"ref-B-w4a4-mixed-input-weighted_weight_ranges@{args.draw}")[:2]
    teacher = build_model(spec).eval()
    calib = measurer.calib(args.draw)
    sets = {
        "calib": calib,
        "views": augment(calib, torch.Generator().manual_seed(999)),
        "dev": torch.cat([images for images, _ in measurer.dev()])[::10],
    }
    with torch.no_grad():
        shapes = FeatureShapes.of(extract_features(teacher, calib[:2], attention=False), num_images=len(calib))
    nmse = build_loss("nmse", shapes)

    @torch.no_grad()
    def scores(model: torch.nn.Module) -> dict[str, float]:
        out = {}
        for name, images in sets.items():
            chunks = images.split(16)
            errors = [
                nmse(extract_features(model, c, attention=False), extract_features(teacher, c, attention=False))
                * len(c)
                for c in chunks
            ]
            out[f"nmse {name}"] = round(float(sum(errors)) / len(images), 4)
        for name in ("calib", "dev"):
            student, target = model(sets[name]).log_softmax(-1), teacher(sets[name]).log_softmax(-1)
            kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
            out[f"KL {name}"] = round(kl.item(), 4)
        return out

    print("before", scores(quantized), flush=True)
    if args.cls_weight:
        recover_module = sys.modules["lrpq.recovery.recover"]
        recover_module.build_loss = lambda spec, shapes: ClassTokenWeightedNMSE(args.cls_weight)
    model = copy.deepcopy(quantized)
    config = RecoveryConfig(**{**fields, "seed": args.draw + fields.get("seed", 0)})
    report = recover(model, teacher, calib, config, progress=False)
    print("after", args.variant, f"cls {args.cls_weight}", scores(model), flush=True)
    print(
        "levels moved", report.changed_levels, "seconds", report.seconds, "curve", [round(c, 3) for c in report.curve]
    )


if __name__ == "__main__":
    main()
