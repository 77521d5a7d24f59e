"""Measurement only: GPTQ of qkv and fc1 again on their *quantized* inputs, before the default recovery.

The calibration pass rounds every Linear by GPTQ on ``XᵀX`` of its float inputs, while the activation
grids are still being calibrated. This probe takes a cached ref-B W4A4 ``--mixed`` run (input-weighted
ranges), collects ``XᵀX`` of what qkv and fc1 read with every quantizer on (the post-LayerNorm inputs,
clipped by the folded target grid), rounds both again on their unchanged grids, and evaluates the
model unrecovered and after the default recovery (the draw's seed). Rows go where
``recovery_table.py --quant "input-weighted ranges, GPTQ on quantized inputs"`` would store them:

    python scripts/probe_gptq_quantized_inputs.py --draws 0 1 2 --threads 2 --cache /work/runs-cache \
        --out results/recovery-avx512
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from measure import REFERENCES
from recovery_table import Measurements, ReferenceModel

from lrpq.api import weighted_layers
from lrpq.calibrate import observe_outputs
from lrpq.evaluate import evaluate
from lrpq.gptq import SecondMoment, gptq_round
from lrpq.models import build_model
from lrpq.recovery import RecoveryConfig, recover

KINDS = ("attn.qkv", "mlp.fc1")
QUANT = {"weight_range_metric": "inputs"}


def round_on_quantized_inputs(model: torch.nn.Module, calib: torch.Tensor) -> int:
    """GPTQ of every qkv and fc1 on ``XᵀX`` of its quantized input; returns how many weights changed level."""
    layers = {name: layer for name, layer in weighted_layers(model).items() if name.endswith(KINDS)}
    assert all(layer.input_reparam is None for layer in layers.values()), "a held fold: F.linear reads another input"
    moments = {name: SecondMoment(layer.in_features) for name, layer in layers.items()}
    with torch.no_grad(), observe_outputs({n: layer.input_quantizer for n, layer in layers.items()}, moments):
        for start in range(0, len(calib), 8):
            model(calib[start : start + 8])
    changed = 0
    with torch.no_grad():
        for name, layer in layers.items():
            grid, weight = layer.weight_quantizer, layer.weight.detach()
            before = grid.codes(weight)
            rounded = gptq_round(weight, moments[name].matrix, grid.scale, grid.zero_point, grid.bits)
            grid.rounding_offset.copy_(grid.rounding_offsets(weight, rounded))
            changed += int((grid.codes(weight) != before).sum())
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = ReferenceModel("ref-B", REFERENCES["ref-B"], args.cache, None, ("input-weighted weight ranges", QUANT))
    group = Measurements(args.out, "ref-B-w4a4-mixed-input-weighted_ranges_GPTQ_on_quantized_inputs")
    for draw in args.draws:
        model = ref.quantized(4, "mixed", draw)
        changed = round_on_quantized_inputs(model, ref.calib(draw))
        base = {"model": "ref-B", "limit": None, "threads": args.threads, "quant": QUANT, "bits": 4, "plan": "mixed"}
        setting = {**base, "draw": draw, "probe": "GPTQ of qkv and fc1 on quantized inputs", "recovery": None}
        row = group.put("unrecovered", draw, setting, evaluate(model, ref.dev(), progress=False), changed=changed)
        print(f"draw {draw}: {changed} levels changed, unrecovered {row['top1']:.2f}", flush=True)
        recovery = RecoveryConfig(seed=draw)
        recovered = copy.deepcopy(model)
        report = recover(recovered, build_model(ref.spec), ref.calib(draw), recovery, progress=False)
        setting = {**setting, "recovery": recovery.to_json_dict()}
        facts = {"steps": report.steps, "seconds": report.seconds, "curve": list(report.curve)}
        row = group.put("nmse", draw, setting, evaluate(recovered, ref.dev(), progress=False), **facts)
        print(f"draw {draw}: recovered {row['top1']:.2f}", flush=True)


if __name__ == "__main__":
    main()
