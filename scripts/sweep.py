"""Choose a default by measurement: named config variants × calibration draws, on a reference model's dev folder.

Every variant is quantized once per calibration draw (32 images drawn from the calib folder with that
seed; seed 0 is the fixed list in ``calib/``) and evaluated on the whole dev folder, keeping each
image's correctness. The summary gives every variant's top-1 per draw, its mean, and its gap to the
first variant averaged over the draws, with a paired 95 % interval over images (each image's
correctness averaged over the draws, as ``scripts/calibration_spread.py`` does). Results are stored
per (variant, draw) in ``--out`` and reused when their setting is unchanged, so a sweep resumes.

    python scripts/sweep.py --model ref-B --wbits 4 --abits 4 --draws 0 1 2 --out results/sweeps/crl-k.json \
        --variant "k=inf" '{"clip_k": null}' --variant "k=1" '{"clip_k": 1.0}' --variant "k=2" '{"clip_k": 2.0}'

A variant is a JSON object of ``QuantConfig`` fields, plus optionally ``"mixed": {"allocator": ...,
"budget": ...}`` (any keyword of ``lrpq.allocation.plans.mixed_plan``) for a mixed-precision plan at
the target's mean bits; relevance scores and layer noise are computed once per draw and shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_table import REFERENCES, Reference

from lrpq import QuantConfig, quantize
from lrpq.data import draw_calibration_set, load_calibration_images, make_loader
from lrpq.evaluate import Z_95, EvalResult, evaluate
from lrpq.models import build_model, resolve_model


def _dev_batches(ref: Reference, batch_size: int, limit: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The dev folder decoded once, so every variant is evaluated on the same tensors without re-reading."""
    spec = resolve_model(str(ref.card))
    num_classes = build_model(spec).num_classes
    return list(make_loader(ref.data / "dev", spec.data_config, spec.classes, num_classes, batch_size, limit))


class _Inputs:
    """Per draw, what several variants share: the calibration images, relevance scores, layer noise."""

    def __init__(self, ref: Reference) -> None:
        self.ref, self.spec = ref, resolve_model(str(ref.card))
        self._calib: dict[int, torch.Tensor] = {}
        self._scores: dict[int, object] = {}
        self._noise: dict[tuple[int, str], object] = {}

    def calib(self, draw: int) -> torch.Tensor:
        if draw not in self._calib:
            paths = draw_calibration_set(self.ref.data / "calib", 32, draw)
            self._calib[draw] = load_calibration_images(paths, self.spec.data_config)
        return self._calib[draw]

    def quantized(self, variant: dict[str, Any], wbits: float, abits: float, draw: int) -> torch.nn.Module:
        from lrpq.allocation.plans import NOISE_ALLOCATORS, RELEVANCE_ALLOCATORS, mixed_plan

        fields = {key: value for key, value in variant.items() if key != "mixed"}
        config = dataclasses.replace(QuantConfig(math.ceil(wbits), math.ceil(abits)), **fields)
        torch.manual_seed(draw)
        model = build_model(self.spec)
        calib = self.calib(draw)
        if "mixed" in variant:
            mixed = dict(variant["mixed"])
            allocator = mixed["allocator"]
            noise_key = (draw, json.dumps(config.to_json_dict(), sort_keys=True), json.dumps(mixed.get("noise_method")))
            plan = mixed_plan(
                model,
                config,
                calib,
                wbits=wbits,
                abits=abits,
                scores=self._scores.get(draw) if allocator in RELEVANCE_ALLOCATORS else None,
                noise=self._noise.get(noise_key) if allocator in NOISE_ALLOCATORS else None,
                progress=False,
                **mixed,
            )
            if plan.scores is not None:
                self._scores[draw] = plan.scores
            if plan.noise is not None:
                self._noise[noise_key] = plan.noise
            config = config.with_plan(plan.plan)
        return quantize(model, config, calib, progress=False)


def _pack(correct: tuple[bool, ...]) -> str:
    return np.packbits(np.array(correct, dtype=bool)).tobytes().hex()


def _unpack(row: dict) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(row["correct"]), dtype=np.uint8))[: row["n"]]
    return bits.astype(float)


def mean_gap(model: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """Mean top-1 gap in points over draws, with its paired 95 % interval over images."""
    per_image = model.mean(0) - reference.mean(0)
    half = Z_95 * per_image.std() / math.sqrt(per_image.size)
    return 100 * per_image.mean(), 100 * (per_image.mean() - half), 100 * (per_image.mean() + half)


def summary(rows: dict[str, dict], variants: dict[str, dict], draws: list[int]) -> str:
    """Markdown: top-1 per draw, mean, and the gap to the first variant over the draws both have."""
    names = list(variants)
    lines = [
        "| variant | " + " | ".join(f"draw {d}" for d in draws) + " | mean | − " + names[0] + " |",
        "|---|" + "---:|" * (len(draws) + 2),
    ]
    for name in names:
        have = [d for d in draws if f"{name}@{d}" in rows]
        if not have:
            continue
        cells = [f"{rows[f'{name}@{d}']['top1']:.2f}" if d in have else "–" for d in draws]
        correct = np.array([_unpack(rows[f"{name}@{d}"]) for d in have])
        cells.append(f"{100 * correct.mean():.2f}")
        base = [d for d in have if f"{names[0]}@{d}" in rows]
        if name != names[0] and base:
            reference = np.array([_unpack(rows[f"{names[0]}@{d}"]) for d in base])
            gap = mean_gap(np.array([_unpack(rows[f"{name}@{d}"]) for d in base]), reference)
            cells.append(f"{gap[0]:+.2f} ({gap[1]:+.2f} … {gap[2]:+.2f})")
        else:
            cells.append("")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = REFERENCES[args.model]
    variants = {name: json.loads(text) for name, text in args.variant}
    rows = json.loads(args.out.read_text()) if args.out.is_file() else {}
    inputs = _Inputs(ref)
    dev = None
    for draw in args.draws:
        for name, variant in variants.items():
            setting = {"model": args.model, "wbits": args.wbits, "abits": args.abits, "variant": variant}
            setting |= {"draw": draw, "limit": args.limit, "threads": args.threads}
            key = f"{name}@{draw}"
            if rows.get(key, {}).get("setting") == setting:
                continue
            dev = dev if dev is not None else _dev_batches(ref, 100, args.limit)
            started = time.perf_counter()
            model = inputs.quantized(variant, args.wbits, args.abits, draw)
            quantize_seconds = time.perf_counter() - started
            result: EvalResult = evaluate(model, dev, progress=False)
            rows[key] = {
                "top1": result.top1,
                "n": result.n,
                "correct": _pack(result.correct),
                "quantize_seconds": round(quantize_seconds, 1),
                "setting": setting,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
            print(f"{key:<24} top-1 {result.top1:6.2f}%  ({quantize_seconds:.0f} s quantize)", flush=True)
    table = summary(rows, variants, args.draws)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
