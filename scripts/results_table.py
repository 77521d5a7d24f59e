"""Reproduce the README accuracy table on the shared reference models.

For each reference model: float top-1, the naive floor (per-tensor min-max everywhere, no
reparameterization), fixed W8A8 / W6A6 / W4A4 with and without CRL, and mixed precision at the same
average bits. Calibration uses the fixed 32-image lists in ``calib/``; evaluation uses the whole
``dev`` folder unless ``--limit`` is given. Writes ``results/<model>.json`` per reference model and
``results/results.md``, a table over every ``results/*.json`` present (so models can run in parallel).

    python scripts/results_table.py                                  # both models, full dev sets
    python scripts/results_table.py --models ref-B --limit 300       # one model, a subset
    python scripts/results_table.py --models ref-B --rows "W4A4 reparam" "W4A4 reparam, mixed, measured"

Each row stores its per-image correctness, from which ``results.md`` gets a second table: every mixed
row against its fixed-bit twin and against float, with a paired 95 % interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrpq import QuantConfig, quantize
from lrpq.allocation.from_relevance import DEFAULT_RELEVANCE_IMAGES, relevance_bit_plan, widths_for
from lrpq.allocation.noise_measurement import (
    DEFAULT_NOISE_IMAGES,
    SENSITIVITY_ALLOCATOR,
    LayerNoise,
    measure_layer_noise,
    plan_from_noise,
)
from lrpq.data import draw_calibration_set, load_calibration_images, make_loader, read_calibration_list
from lrpq.evaluate import EvalResult, PairedGap, evaluate
from lrpq.models import build_model, resolve_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class Reference:
    label: str
    card: Path
    data: Path
    calib_list: Path


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

# (row label, config or None for float, allocator for mixed precision or None for fixed bits). "mixed"
# uses the paper rule, "mixed, exact allocator" the budgeted solver, both from relevance; "mixed, measured"
# the sensitivity allocator (each layer's logit noise measured at every width). "LN reparam" is
# RepQ-ViT's post-LayerNorm reparameterization alone; "reparam" adds the same channel fold for the
# post-GELU input of fc2, the key centring of q·kᵀ, the head rotation and the online rotation of fc2's
# input (lrpq's defaults); "keys not centred" leaves the keys as they are, "heads not rotated" leaves
# q, k and v unrotated, "hidden not rotated" leaves fc2's input unrotated; "CRL k=2"
# clips the channel scales of both folds to mean ± 2·std. Weights are rounded by GPTQ (the default)
# unless the row says "nearest rounding" (``gptq=False``, RepQ-ViT's rounding). "bias corr." sets every
# layer's quantized output mean back to its float mean, layer after layer (opt-in); "output ranges"
# compares activation ranges by the first-order error they cause at the logits (range_metric="output",
# opt-in).
UNROTATED = {"rotate_heads": False, "rotate_hidden": False}
NO_REPARAM = {"ln_reparam": False, "post_gelu_reparam": False, "center_keys": False, **UNROTATED}
REPQ_VIT = {"post_gelu_reparam": False, "center_keys": False, **UNROTATED}
NEAREST = {"gptq": False}
BC = {"bias_correction": True}
OUTPUT = {"range_metric": "output"}
MIXED = (("mixed", "paper"), ("mixed, exact allocator", "exact"), ("mixed, measured", SENSITIVITY_ALLOCATOR))
ALL = ("paper", "exact", SENSITIVITY_ALLOCATOR)
RELEVANCE = ("paper", "exact")
Row = tuple[str, QuantConfig | None, str | None]


FIXED_TWIN: dict[str, str] = {}  # mixed row label -> the fixed-bit row with the same config and mean bits


def _with_mixed(label: str, config: QuantConfig, allocators: tuple[str, ...]) -> list[Row]:
    """The fixed-bit row and its mixed-precision twins with the named allocators, same mean bits."""
    mixed = [(f"{label}, {suffix}", config, allocator) for suffix, allocator in MIXED if allocator in allocators]
    FIXED_TWIN.update((mixed_label, label) for mixed_label, _, _ in mixed)
    return [(label, config, None), *mixed]


ROWS: list[Row] = [
    ("float", None, None),
    ("naive W4A4 (per-tensor min-max)", QuantConfig.naive(4, 4), None),
    ("W8A8 reparam", QuantConfig(8, 8), None),
    ("W6A6 no reparam", QuantConfig(6, 6, **NO_REPARAM), None),
    ("W6A6 LN reparam", QuantConfig(6, 6, **REPQ_VIT), None),
    ("W6A6 reparam, keys not centred", QuantConfig(6, 6, center_keys=False), None),
    ("W6A6 reparam, heads not rotated", QuantConfig(6, 6, rotate_heads=False), None),
    ("W6A6 reparam, hidden not rotated", QuantConfig(6, 6, rotate_hidden=False), None),
    *_with_mixed("W6A6 reparam", QuantConfig(6, 6), ALL),
    ("W4A4 no reparam", QuantConfig(4, 4, **NO_REPARAM), None),
    ("W4A4 LN reparam", QuantConfig(4, 4, **REPQ_VIT), None),
    ("W4A4 reparam, keys not centred", QuantConfig(4, 4, center_keys=False), None),
    ("W4A4 reparam, heads not rotated", QuantConfig(4, 4, rotate_heads=False), None),
    ("W4A4 reparam, hidden not rotated", QuantConfig(4, 4, rotate_hidden=False), None),
    ("W4A4 reparam + CRL k=2", QuantConfig(4, 4, clip_k=2.0), None),
    *_with_mixed("W4A4 reparam", QuantConfig(4, 4), ALL),
    ("W6A6 reparam + bias corr.", QuantConfig(6, 6, **BC), None),
    *_with_mixed("W4A4 reparam + bias corr.", QuantConfig(4, 4, **BC), ALL),
    *_with_mixed("W6A6 reparam + output ranges", QuantConfig(6, 6, **OUTPUT), ALL),
    *_with_mixed("W4A4 reparam + output ranges", QuantConfig(4, 4, **OUTPUT), (SENSITIVITY_ALLOCATOR,)),
    *_with_mixed("W4A4 reparam + bias corr. + output ranges", QuantConfig(4, 4, **BC, **OUTPUT), RELEVANCE),
    ("W8A8 reparam, nearest rounding", QuantConfig(8, 8, **NEAREST), None),
    ("W6A6 no reparam, nearest rounding", QuantConfig(6, 6, **NO_REPARAM, **NEAREST), None),
    ("W6A6 LN reparam, nearest rounding (RepQ-ViT)", QuantConfig(6, 6, **REPQ_VIT, **NEAREST), None),
    ("W6A6 reparam, nearest rounding, keys not centred", QuantConfig(6, 6, center_keys=False, **NEAREST), None),
    ("W6A6 reparam, nearest rounding, heads not rotated", QuantConfig(6, 6, rotate_heads=False, **NEAREST), None),
    *_with_mixed("W6A6 reparam, nearest rounding", QuantConfig(6, 6, **NEAREST), ALL),
    ("W4A4 no reparam, nearest rounding", QuantConfig(4, 4, **NO_REPARAM, **NEAREST), None),
    ("W4A4 LN reparam, nearest rounding (RepQ-ViT)", QuantConfig(4, 4, **REPQ_VIT, **NEAREST), None),
    ("W4A4 reparam, nearest rounding, keys not centred", QuantConfig(4, 4, center_keys=False, **NEAREST), None),
    ("W4A4 reparam, nearest rounding, heads not rotated", QuantConfig(4, 4, rotate_heads=False, **NEAREST), None),
    ("W4A4 reparam, nearest rounding + CRL k=2", QuantConfig(4, 4, clip_k=2.0, **NEAREST), None),
    *_with_mixed("W4A4 reparam, nearest rounding", QuantConfig(4, 4, **NEAREST), ALL),
    *_with_mixed("W6A6 reparam, nearest rounding + bias corr.", QuantConfig(6, 6, **NEAREST, **BC), RELEVANCE),
    *_with_mixed("W4A4 reparam, nearest rounding + bias corr.", QuantConfig(4, 4, **NEAREST, **BC), ALL),
    ("W6A6 reparam, nearest rounding + output ranges", QuantConfig(6, 6, **NEAREST, **OUTPUT), None),
]

ROW_SETTINGS = {label: (config, allocator) for label, config, allocator in ROWS}


def _same_setting(stored: dict | None, wanted: dict) -> bool:
    """Whether a stored row was measured as ``wanted`` asks, reading its config through QuantConfig.

    A config field added after a row was stored is absent from it and takes its default, which is
    right as long as new fields default to the behaviour that existed before them. ``rotate_heads`` did
    not, nor did ``gptq`` once it became the default, nor ``rotate_hidden``: the rows stored before each
    were rewritten to say ``false``, and relabelled ("nearest rounding") where the label had meant the
    default; the mixed rows stored before the setting named the allocator were rewritten to say ``paper``.
    """
    if stored is None or {k: v for k, v in stored.items() if k != "config"} != {
        k: v for k, v in wanted.items() if k != "config"
    }:
        return False
    if stored["config"] is None or wanted["config"] is None:
        return stored["config"] == wanted["config"]
    return QuantConfig.from_json_dict(stored["config"]) == QuantConfig.from_json_dict(wanted["config"])


def _row_setting(
    config: QuantConfig | None,
    allocator: str | None,
    limit: int | None,
    relevance_images: int,
    calib_seed: int | None = None,
) -> dict:
    """What a row is measured with: a stored row is reused only if its setting is this one."""
    return (
        {
            "config": config.to_json_dict() if config is not None else None,
            "limit": limit,
            "relevance_images": relevance_images if allocator and allocator != SENSITIVITY_ALLOCATOR else None,
            "allocator": allocator,
        }
        | ({"noise_images": DEFAULT_NOISE_IMAGES, "noise_layers": "all"} if allocator == SENSITIVITY_ALLOCATOR else {})
        | ({"calib_seed": calib_seed} if calib_seed is not None else {})
    )


def _measured_noise(
    cache: dict[str, tuple[LayerNoise, float]], model: torch.nn.Module, config: QuantConfig, calib: torch.Tensor
) -> tuple[LayerNoise, float]:
    """The layer noise for ``config`` (measured without GPTQ and bias correction, so cached without them)."""
    key = json.dumps(dataclasses.replace(config, gptq=False, bias_correction=False).to_json_dict(), sort_keys=True)
    if key not in cache:
        started = time.perf_counter()
        noise = measure_layer_noise(model, config, calib, widths_for(config.wbits, config.abits), progress=False)
        cache[key] = noise, time.perf_counter() - started
    return cache[key]


def run_reference(
    ref: Reference,
    limit: int | None,
    relevance_images: int,
    seed: int,
    done: dict,
    only: Collection[str] | None = None,
    calib_seed: int | None = None,
) -> Iterator[dict]:
    """Top-1 of every row not already in ``done``, yielding all rows after each one.

    Rows are keyed by label, so an interrupted run resumes; a stored row is reused only if it was
    measured with the same configuration, image limit, relevance images and allocator, and re-run
    otherwise. ``only`` names rows to run even if stored (the others keep what is stored), e.g. to
    measure a fixed row and its mixed twin on one machine. ``calib_seed`` draws the calibration images
    from the calib folder with that seed instead of reading the fixed list.
    """
    spec = resolve_model(str(ref.card))
    calib_paths = read_calibration_list(ref.calib_list, ref.data / "calib")
    if calib_seed is not None:  # as many images as the fixed list, another draw
        calib_paths = draw_calibration_set(ref.data / "calib", len(calib_paths), calib_seed)
    calib = load_calibration_images(calib_paths, spec.data_config)
    relevance_set = load_calibration_images(
        draw_calibration_set(ref.data / "calib", relevance_images, seed), spec.data_config
    )
    rows = {label: row for label, row in done.items() if label in {row_label for row_label, _, _ in ROWS}}
    measured: dict[str, tuple[LayerNoise, float]] = {}  # rows that differ only in GPTQ / bias corr. share one
    for label, config, allocator in ROWS:
        if only is not None and label not in only:
            continue
        setting = _row_setting(config, allocator, limit, relevance_images, calib_seed)
        if only is None and label in rows and _same_setting(rows[label].get("setting"), setting):
            continue
        torch.manual_seed(seed)
        model = build_model(spec)
        started = time.perf_counter()
        plan_mean = None
        measure_seconds = None
        if config is not None:
            if allocator == SENSITIVITY_ALLOCATOR:
                noise, measure_seconds = _measured_noise(measured, model, config, calib)
                plan = plan_from_noise(noise, wbits=config.wbits, abits=config.abits)
            elif allocator:
                plan, _ = relevance_bit_plan(
                    model, relevance_set, wbits=config.wbits, abits=config.abits, allocator=allocator
                )
            if allocator:
                config = config.with_plan(plan)
                plan_mean = {"wbits": plan.mean_bits("wbits"), "abits": plan.mean_bits("abits")}
            quantize(model, config, calib, progress=False)
        seconds = time.perf_counter() - started
        loader = make_loader(ref.data / "dev", spec.data_config, spec.classes, model.num_classes, 100, limit)
        result = evaluate(model, loader)
        rows[label] = {
            **result.to_json_dict(),
            "correct": _pack(result.correct),
            "quantize_seconds": round(seconds, 1),
            "plan": plan_mean,
            **({"measure_seconds": round(measure_seconds, 1)} if measure_seconds is not None else {}),
            "setting": setting,
        }
        print(f"{ref.label:<28} {label:<34} top-1 {result.top1:6.2f}%", flush=True)
        yield rows


def _pack(correct: tuple[bool, ...]) -> str:
    """Per-image correctness as hex (8 images a byte), so a row's JSON stays small on 5,000 images."""
    return np.packbits(np.array(correct, dtype=bool)).tobytes().hex()


def unpack_row(row: dict) -> EvalResult:
    """A stored row as an ``EvalResult`` with its per-image correctness (empty if stored without it)."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(row.get("correct", "")), dtype=np.uint8))[: row["n"]]
    correct = tuple(bits.astype(bool).tolist())
    return EvalResult(row["top1"], row["top5"], row["n"], row["skipped"], row["seconds"], correct)


def _gap_cell(model: dict | None, reference: dict | None) -> str:
    """``model − reference`` in points with its paired 95 % interval; – where either lacks per-image results
    or the two were measured on different image counts."""
    if any(row is None or "correct" not in row for row in (model, reference)) or model["n"] != reference["n"]:
        return "–"
    gap = PairedGap.between(unpack_row(model), unpack_row(reference))
    low, high = gap.confidence_interval()
    return f"{gap.difference:+.2f} ({low:+.2f} … {high:+.2f})"


def is_current(row: dict, label: str, limit: int | None, relevance_images: int | None, calib_seed: int | None) -> bool:
    """Whether a stored row ``label`` was measured with the row's current setting on these images."""
    config, allocator = ROW_SETTINGS[label]
    wanted = _row_setting(config, allocator, limit, relevance_images, calib_seed)
    return _same_setting(row.get("setting"), wanted)


def _is_current(results: dict[str, dict], name: str, label: str, relevance_images: int, calib_seed: int | None) -> bool:
    """Whether model ``name``'s stored row ``label`` was measured with the row's current setting."""
    limit = results[name]["float"]["setting"]["limit"]
    return is_current(results[name][label], label, limit, relevance_images, calib_seed)


def paired_markdown(results: dict[str, dict], relevance_images: int, calib_seed: int | None = None) -> str:
    """Each mixed row against its fixed-bit twin and against float, image by image on the same images.

    Top-1 alone cannot say whether a 0.5-point difference on 600 images (3 images) is real; the paired
    interval can, since only the images where exactly one of the two models is right move it. A pair
    kept from an earlier setting of its rows is marked † as in the top-1 table.
    """
    names = [name for name in REFERENCES if name in results]
    header = "| mixed row | " + " | ".join(f"{name}: − fixed | {name}: − float" for name in names) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(names)]
    stale = False
    for label, twin in FIXED_TWIN.items():
        cells = []
        for name in names:
            rows = results[name]
            model = rows.get(label)
            cells += [_gap_cell(model, rows.get(twin)), _gap_cell(model, rows.get("float"))]
            if model is not None and cells[-2:] != ["–", "–"]:
                old = not all(_is_current(results, name, row, relevance_images, calib_seed) for row in (label, twin))
                stale |= old
                cells[-2:] = [cell + (" †" if old and cell != "–" else "") for cell in cells[-2:]]
        if any(cell != "–" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    note = " † measured with an earlier setting of its rows, not re-run since." if stale else ""
    return "\n".join(lines) + (
        "\n\nTop-1 difference in points, mixed row minus its fixed-bit twin (same config and mean bits) and minus "
        "float, with the paired 95% interval (normal approximation over the images where exactly one of the two "
        f"is right). Rows stored without per-image results show –.{note}\n"
    )


def markdown(results: dict[str, dict], relevance_images: int, calib_seed: int | None = None) -> str:
    """The table; a cell whose stored setting is not the row's current one (e.g. a row kept from before
    its method changed, when ``--rows`` ran others) is marked † until it is re-run."""
    names = [name for name in REFERENCES if name in results]
    header = "| configuration | " + " | ".join(REFERENCES[name].label for name in names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    stale = False
    for label, _, _ in ROWS:
        cells = []
        for name in names:
            row = results[name].get(label)
            if row is None:
                cells.append("–")
                continue
            current = _is_current(results, name, label, relevance_images, calib_seed)
            stale |= not current
            cells.append(f"{row['top1']:.2f}" + ("" if current else " †"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{REFERENCES[name].label}: {results[name]['float']['n']} images" for name in names)
    note = " † measured with an earlier setting of its row, not re-run since." if stale else ""
    return "\n".join(lines) + f"\n\nTop-1 (%) on the dev folders ({counts}).{note}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCES), default=sorted(REFERENCES))
    parser.add_argument("--limit", type=int, help="evaluate an evenly spaced subset of each dev folder")
    parser.add_argument("--relevance-images", type=int, default=DEFAULT_RELEVANCE_IMAGES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the relevance images and of torch")
    parser.add_argument(
        "--calib-seed",
        type=int,
        help="draw the calibration images from the calib folder with this seed instead of the fixed lists in calib/ "
        "(the spread over draws: scripts/calibration_spread.py)",
    )
    parser.add_argument(
        "--rows", nargs="+", choices=[label for label, _, _ in ROWS], help="run only these rows, stored or not"
    )
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process (default 1): the summation order of a multi-threaded run differs, and "
        "ref-B's top-1 moves by up to two points with it, so rows are comparable only at one thread count",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        parser.error(f"the shared reference models and data are expected at {SHARED}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        path = args.out / f"{name}.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        runs = run_reference(
            REFERENCES[name], args.limit, args.relevance_images, args.seed, done, args.rows, args.calib_seed
        )
        for rows in runs:
            path.write_text(json.dumps(rows, indent=2) + "\n")
    stored = {path.stem: json.loads(path.read_text()) for path in sorted(args.out.glob("*.json"))}
    results = {name: rows for name, rows in stored.items() if name in REFERENCES}
    table = markdown(results, args.relevance_images, args.calib_seed)
    table += "\n" + paired_markdown(results, args.relevance_images, args.calib_seed)
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
