"""What the measurement scripts share: the reference models, calibration draws, and paired gaps over draws.

A *row* is a label, mean-bits targets and a *variant*: a JSON object of ``QuantConfig`` fields, plus
optionally ``"mixed": {...}`` (keywords of ``lrpq.allocation.plans.mixed_plan``: allocator, budget,
relevance_weight …). Every row is quantized once per calibration draw (32 images drawn from the calib
folder with that seed; seed 0 is the fixed list in ``calib/``) and evaluated on the whole dev folder,
keeping each image's correctness, the plan's cost against fixed bits, and the time. Results are
stored per ``label@draw`` and reused while their setting is unchanged, so a run resumes.

A gap between two rows is averaged over the draws both have, with a paired 95 % interval over
images: each image's correctness is averaged over the draws, and the interval is the mean per-image
difference ± 1.96 standard errors (``lrpq.evaluate.PairedGap``'s, for one draw).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrpq import QuantConfig, quantize
from lrpq.allocation.budget import quantized_model_cost
from lrpq.allocation.from_relevance import widths_for
from lrpq.allocation.plans import (
    DEFAULT_MIN_WBITS,
    DEFAULT_RELEVANCE_SCALE,
    DEFAULT_RELEVANCE_WEIGHT,
    NOISE_ALLOCATORS,
    RELEVANCE_ALLOCATORS,
    default_budget,
    mixed_plan,
    weight_floor,
)
from lrpq.data import draw_calibration_set, load_calibration_images, make_loader
from lrpq.evaluate import Z_95, EvalResult, evaluate
from lrpq.models import build_model, resolve_model
from lrpq.outputs import replace_text

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CALIBRATION_IMAGES = 32


@dataclass(frozen=True)
class Reference:
    label: str
    card: Path
    data: Path
    calib_list: Path  # draw 0's 32 calibration images, fixed in calib/


REFERENCES = {
    "ref-A": Reference(
        "ref-A ViT CIFAR-10",
        SHARED / "models/vit_cifar10.json",
        SHARED / "data/cifar10",
        REPO / "calib/cifar10_seed0_n32.txt",
    ),
    "ref-B": Reference(
        "ref-B ViT-S/14 Imagenette",
        SHARED / "models/vits14_imagenette.json",
        SHARED / "data/imagenette",
        REPO / "calib/imagenette_seed0_n32.txt",
    ),
}


def pack_correct(correct: Sequence[bool]) -> str:
    """Per-image correctness as hex (8 images a byte), so a stored row stays small on 5,000 images."""
    return np.packbits(np.array(correct, dtype=bool)).tobytes().hex()


def unpack_correct(row: dict[str, Any]) -> np.ndarray:
    """A stored row's per-image correctness (0/1 per image; empty if stored without it)."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(row.get("correct", "")), np.uint8))[: row["n"]]


def unpack_row(row: dict[str, Any]) -> EvalResult:
    """A stored ``EvalResult.to_json_dict()`` row as an ``EvalResult`` with its per-image correctness."""
    correct = tuple(unpack_correct(row).astype(bool).tolist())
    return EvalResult(row["top1"], row["top5"], row["n"], row["skipped"], row["seconds"], correct)


@dataclass(frozen=True)
class Row:
    """A measured configuration: float (``targets`` None) or quantized at mean widths ``targets``."""

    label: str
    targets: tuple[float, float] | None
    variant: dict[str, Any] = dataclasses.field(default_factory=dict)

    def setting(self, draw: int, limit: int | None, threads: int) -> dict[str, Any]:
        """What the stored result of this row and draw must have been measured with to be reused."""
        targets = None if self.targets is None else list(self.targets)
        return {"targets": targets, "variant": self.variant, "draw": draw, "limit": limit, "threads": threads}


def resolved(setting: dict[str, Any]) -> dict[str, Any]:
    """``setting`` with its mixed plan's defaults written out (the budget; the relevance allocator's weight;
    the narrowest weight width, as the width it comes to), so a row that asks for the default and one that
    names it compare equal, and neither matches a result measured under another default. Rows stored
    before a default existed name the value they were measured with."""
    mixed = setting["variant"].get("mixed")
    if mixed is None:
        return setting
    filled = {"budget": default_budget(mixed["allocator"]), **mixed}
    if mixed["allocator"] != "paper":
        wbits, abits = setting["targets"]
        widths = widths_for(wbits, abits, tuple(mixed["widths"]) if "widths" in mixed else None)
        filled["min_wbits"] = weight_floor(wbits, widths, mixed.get("min_wbits", DEFAULT_MIN_WBITS))
    if mixed["allocator"] == "relevance":
        filled = {"relevance_weight": DEFAULT_RELEVANCE_WEIGHT, "relevance_scale": DEFAULT_RELEVANCE_SCALE, **filled}
    return {**setting, "variant": {**setting["variant"], "mixed": filled}}


def is_stored(stored: dict[str, dict], key: str, wanted: dict[str, Any]) -> bool:
    """Whether ``stored`` holds ``key`` measured with the resolved setting ``wanted``."""
    return key in stored and resolved(stored[key]["setting"]) == wanted


def adopt(
    stored: dict[str, dict], rows: list[Row], draws: list[int], sources: list[Path], *, limit: int | None, threads: int
) -> list[str]:
    """Copy into ``stored`` each ``row@draw`` it lacks that a file in ``sources`` (e.g. a sweep's) measured with
    the same resolved setting; returns the keys adopted. Saves measuring a configuration twice."""
    measured = [
        (resolved(entry["setting"]), entry) for path in sources for entry in json.loads(path.read_text()).values()
    ]
    adopted = []
    for draw in draws:
        for row in rows:
            key, wanted = f"{row.label}@{draw}", resolved(row.setting(draw, limit, threads))
            if is_stored(stored, key, wanted):
                continue
            match = next((entry for setting, entry in measured if setting == wanted), None)
            if match is not None:
                stored[key] = match
                adopted.append(key)
    return adopted


class Measurer:
    """Quantizes and evaluates rows of one reference model, sharing per draw what rows have in common."""

    def __init__(self, ref: Reference, limit: int | None, threads: int) -> None:
        self.ref, self.limit, self.threads = ref, limit, threads
        self.spec = resolve_model(str(ref.card))
        self._calib: dict[int, torch.Tensor] = {}
        self._shared: dict[tuple, Any] = {}  # (kind, draw, …) → relevance scores or layer noise
        self._dev: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def dev(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The dev folder decoded once, so every row is evaluated on the same tensors."""
        if self._dev is None:
            classes = build_model(self.spec).num_classes
            loader = make_loader(
                self.ref.data / "dev", self.spec.data_config, self.spec.classes, classes, 100, self.limit
            )
            self._dev = list(loader)
        return self._dev

    def calib(self, draw: int) -> torch.Tensor:
        if draw not in self._calib:
            paths = draw_calibration_set(self.ref.data / "calib", CALIBRATION_IMAGES, draw)
            self._calib[draw] = load_calibration_images(paths, self.spec.data_config)
        return self._calib[draw]

    def model(self, row: Row, draw: int) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The row's model for one draw, and what its plan costs (empty for fixed bits and float)."""
        torch.manual_seed(draw)
        model = build_model(self.spec)
        if row.targets is None:
            return model, {}
        wbits, abits = row.targets
        fields = {key: value for key, value in row.variant.items() if key != "mixed"}
        config = dataclasses.replace(QuantConfig(math.ceil(wbits), math.ceil(abits)), **fields)
        calib = self.calib(draw)
        if "mixed" in row.variant:
            mixed = dict(row.variant["mixed"])
            if "widths" in mixed:  # JSON has no tuples
                mixed["widths"] = tuple(mixed["widths"])
            allocator = mixed["allocator"]
            noise_key = ("noise", draw, json.dumps(config.to_json_dict(), sort_keys=True), wbits, abits)
            noise_key += (json.dumps({k: v for k, v in mixed.items() if k.startswith("noise")}, sort_keys=True),)
            plan = mixed_plan(
                model,
                config,
                calib,
                wbits=wbits,
                abits=abits,
                scores=self._shared.get(("scores", draw)) if allocator in RELEVANCE_ALLOCATORS else None,
                noise=self._shared.get(noise_key) if allocator in NOISE_ALLOCATORS else None,
                progress=False,
                **mixed,
            )
            if plan.scores is not None:
                self._shared[("scores", draw)] = plan.scores
            if plan.noise is not None:
                self._shared[noise_key] = plan.noise
            config = config.with_plan(plan.plan)
        quantize(model, config, calib, progress=False)
        return model, quantized_model_cost(model, config, (wbits, abits), tuple(calib.shape[1:]))

    def measure(self, row: Row, draw: int) -> dict[str, Any]:
        started = time.perf_counter()
        model, cost = self.model(row, draw)
        seconds = time.perf_counter() - started
        result = evaluate(model, self.dev(), progress=False)
        return {
            "top1": result.top1,
            "n": result.n,
            "correct": pack_correct(result.correct),
            "quantize_seconds": round(seconds, 1),
            "cost": cost,
            "setting": row.setting(draw, self.limit, self.threads),
        }


def run_rows(
    ref: Reference, rows: list[Row], draws: list[int], path: Path, *, limit: int | None, threads: int, rerun: set[str]
) -> dict[str, dict]:
    """Measure every row on every draw not already stored in ``path`` with its setting (or named in ``rerun``)."""
    torch.set_num_threads(threads)
    stored = json.loads(path.read_text()) if path.is_file() else {}
    measurer = Measurer(ref, limit, threads)
    for draw in draws:
        for row in rows:
            key = f"{row.label}@{draw}"
            if row.label not in rerun and is_stored(stored, key, resolved(row.setting(draw, limit, threads))):
                continue
            stored[key] = measurer.measure(row, draw)
            replace_text(path, json.dumps(stored, indent=1) + "\n")
            print(f"{ref.label:<26} {key:<40} top-1 {stored[key]['top1']:6.2f}%", flush=True)
    return stored


def correctness(stored: dict[str, dict], label: str, draws: list[int]) -> np.ndarray | None:
    """(draws, images) per-image correctness of ``label`` on ``draws``, or None unless all are stored."""
    rows = [stored.get(f"{label}@{draw}") for draw in draws]
    if not draws or any(row is None for row in rows):
        return None
    return np.array([unpack_correct(row) for row in rows])


def mean_gap(model: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """Mean top-1 gap in points over draws, with its paired 95 % interval over images."""
    per_image = model.mean(0) - reference.mean(0)
    half = Z_95 * per_image.std() / math.sqrt(per_image.size)
    return 100 * per_image.mean(), 100 * (per_image.mean() - half), 100 * (per_image.mean() + half)


def gap_cell(stored: dict[str, dict], label: str, reference: str, draws: list[int]) -> str:
    """``label − reference`` over the draws both have, ``+1.23 (−0.40 … +2.86)``; – if none."""
    shared = [d for d in draws if f"{label}@{d}" in stored and f"{reference}@{d}" in stored]
    model, base = correctness(stored, label, shared), correctness(stored, reference, shared)
    if model is None or base is None:
        return "–"
    gap = mean_gap(model, base)
    return f"{gap[0]:+.2f} ({gap[1]:+.2f} … {gap[2]:+.2f})"


def measured_draws(stored: dict[str, dict], label: str, draws: list[int]) -> list[int]:
    return [draw for draw in draws if f"{label}@{draw}" in stored]
