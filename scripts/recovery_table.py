"""Recovery measured: every distillation loss alone and chosen combinations, over calibration draws.

For each reference model, width (W4A4, W3A3) and plan (fixed bits, or ``--mixed`` with the library's
default allocator), each calibration draw (``draw_calibration_set(calib folder, 32, seed)``) is
quantized once and evaluated unrecovered; then a copy of it is recovered with each loss spec
(``lrpq.recovery.recover``, the draw as its seed) and evaluated on the whole dev folder (or
``--limit`` images), keeping every image's correctness. The float model is evaluated once per model.

Every (model, width, plan, row, draw) is stored as one JSON file in ``--out`` and skipped when it is
there with the same setting, so the script resumes; quantized draws are kept as run directories in
``--cache`` so a resumed run does not calibrate again. ``--doc`` gets one table per (model, width,
plan) between the markers below (the rest of the file is left as it is). ``--quant NAME JSON`` quantizes
every draw with those ``QuantConfig`` fields instead, stored under NAME, and adds each row's paired gap
to the same row quantized without them (``--plan-options JSON`` adds ``mixed_plan`` arguments to NAME's
mixed plans). A recovery is seeded by its draw, plus a variant's ``"seed"``: ``--variant "nmse, seed
+100" '{"seed": 100}'`` recovers the same quantized draws again with other batches and views. Each
stored row also records the CPU kernels it ran on. Stored settings record the
thread count, so a re-run at another ``--threads`` measures again; ``--stored-only`` writes the tables
from whatever is stored and measures nothing:

    python scripts/recovery_table.py --models ref-A --bits 4 3 --plans fixed mixed --draws 0 1 2
    python scripts/recovery_table.py --models ref-B --bits 4 --plans fixed --draws 0 1 2   # all 16 losses
    python scripts/recovery_table.py --models ref-B --bits 4 3 --plans fixed mixed --draws 0 1 2 \
        --losses mse --combos "kd+mse"
    python scripts/recovery_table.py --models ref-A --bits 3 --plans fixed --draws 0 --losses mse \
        --variant "mse, rounding only" '{"learn": ["rounding"], "lr_rounding": 0.001}'
    python scripts/recovery_table.py --models ref-B --bits 4 --plans mixed --draws 0 1 2 --stored-only
    python scripts/recovery_table.py --models ref-B --bits 3 --plans mixed --draws 0 1 2 --losses nmse \
        --quant "input-weighted weight ranges" '{"weight_range_metric": "inputs"}'   # and "− without" it
    python scripts/recovery_table.py --models ref-B --bits 3 --plans fixed --draws 0 1 2 --losses \
        --quant "input-weighted weight ranges" '{"weight_range_metric": "inputs"}'   # unrecovered rows alone
    python scripts/recovery_table.py --models ref-B --bits 4 --plans fixed --draws 0 --stored-only \
        --learn rounding scales norms biases   # rows stored as "<row>, learning rounding"

A cell gives the top-1 per draw and its mean; the gaps to the unrecovered model and to float are
averaged over the draws both rows have, with a paired 95 % interval over images (each image's
correctness averaged over the draws, as ``scripts/sweep.py`` does).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from measure import REFERENCES, REPO, Measurer, Reference, mean_gap, pack_correct, unpack_correct

from lrpq import QuantConfig, quantize
from lrpq.allocation.plans import DEFAULT_ALLOCATOR, mixed_plan
from lrpq.config import BitPlan
from lrpq.distill import LOSSES
from lrpq.errors import LrpqError
from lrpq.evaluate import EvalResult, evaluate
from lrpq.models import build_model
from lrpq.outputs import replace_text
from lrpq.recovery import DEFAULT_LEARN, LEARNABLE, RecoveryConfig, recover
from lrpq.runs import is_run_dir, load_run, save_run

START, END = "<!-- recovery-table:start -->", "<!-- recovery-table:end -->"
UNRECOVERED, FLOAT = "unrecovered", "float"
# The plain keyword arguments of ``mixed_plan`` that ``--plan-options`` may set.
PLAN_OPTIONS = (
    "allocator",
    "budget",
    "min_wbits",
    "noise_images",
    "noise_method",
    "relevance_weight",
    "relevance_scale",
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text)


def _completed(setting: dict[str, Any]) -> dict[str, Any]:
    """A stored setting with its recovery's fields completed by their defaults: a row stored before a
    ``RecoveryConfig`` field existed was measured with that field's default."""
    if setting.get("recovery") is None:
        return setting
    return {**setting, "recovery": RecoveryConfig.from_json_dict(setting["recovery"]).to_json_dict()}


class Measurements:
    """The stored rows of one (model, width, plan): ``<out>/<group>/<row>@<draw>.json``."""

    def __init__(self, out: Path, group: str) -> None:
        self.folder = out / group

    def path(self, row: str, draw: int | None) -> Path:
        return self.folder / f"{_slug(row)}{'' if draw is None else f'@{draw}'}.json"

    def get(self, row: str, draw: int | None, setting: dict[str, Any]) -> dict | None:
        path = self.path(row, draw)
        stored = json.loads(path.read_text()) if path.is_file() else None
        return stored if stored is not None and _completed(stored.get("setting", {})) == setting else None

    def put(self, row: str, draw: int | None, setting: dict[str, Any], result: EvalResult, **facts: Any) -> dict:
        correct = pack_correct(result.correct)
        # The CPU kernels a row ran on, a fact rather than a setting: a machine's kernels move a ref-B row by about a
        # point (docs/recovery.md), so rows compare only within one kind of machine.
        kernels = torch.backends.cpu.get_cpu_capability()
        stored = {
            "top1": result.top1,
            "n": result.n,
            "correct": correct,
            **facts,
            "cpu_kernels": kernels,
            "setting": setting,
        }
        replace_text(self.path(row, draw), json.dumps(stored, indent=1) + "\n")
        return stored


class ReferenceModel(Measurer):
    """``Measurer``'s reference model (dev images decoded once, calibration draws) with its quantized draws
    kept as run directories."""

    def __init__(
        self,
        name: str,
        ref: Reference,
        cache: Path,
        limit: int | None,
        quant: tuple[str, dict[str, Any]] | None,
        plan_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(ref, limit, torch.get_num_threads())
        self.name, self.cache = name, cache
        self.quant_name, self.quant_fields = quant if quant is not None else (None, {})
        self.plan_options = plan_options or {}

    def plain_group(self, bits: int, plan: str) -> str:
        """The stored name of a (width, plan) quantized without ``--quant``: ``ref-B-w4a4-mixed``."""
        return f"{self.name}-w{bits}a{bits}-{plan}"

    def group(self, bits: int, plan: str) -> str:
        """The stored name of a (width, plan), with ``--quant``'s name after the plain one."""
        return self.plain_group(bits, plan) + (f"-{_slug(self.quant_name)}" if self.quant_name else "")

    def quantized(self, bits: int, plan: str, draw: int) -> torch.nn.Module:
        """The draw's quantized model, calibrated once and then read back from ``--cache``."""
        folder = self.cache / f"{self.group(bits, plan)}@{draw}"
        config = QuantConfig(bits, bits, **self.quant_fields)
        plan_options = self.plan_options if plan == "mixed" else {}
        made_with = {"draw": draw, **({"plan_options": plan_options} if plan_options else {})}
        if is_run_dir(folder):  # a NAME reused with other fields or plan options is calibrated again
            model, _, cached = load_run(folder)
            summary = json.loads((folder / "summary.json").read_text())
            if dataclasses.replace(cached, bit_plan=BitPlan()) == config and _made_with(summary) == made_with:
                return model
        torch.manual_seed(draw)
        model, calib = build_model(self.spec), self.calib(draw)
        if plan == "mixed":
            options = {"allocator": DEFAULT_ALLOCATOR, **plan_options}
            plan_made = mixed_plan(model, config, calib, **options, progress=False)
            config = config.with_plan(plan_made.plan)
        quantize(model, config, calib, progress=False)
        save_run(folder, model, self.spec, config, made_with, overwrite=True)
        return model


def _made_with(summary: dict[str, Any]) -> dict[str, Any]:
    """What of a cached run's summary says how it was made (``ReferenceModel.quantized`` writes it)."""
    return {key: summary[key] for key in ("draw", "plan_options") if key in summary}


def measure(
    ref: ReferenceModel,
    bits: int,
    plan: str,
    rows: dict[str, dict[str, Any]],
    draws: list[int],
    steps: int | None,
    out: Path,
) -> Measurements:
    """Fill every missing (row, draw) of one (model, width, plan) and return its measurements."""
    group = Measurements(out, ref.group(bits, plan))
    base = {"model": ref.name, "limit": ref.limit, "threads": torch.get_num_threads()}
    if ref.quant_fields:  # a NAME reused with other fields is another measurement
        base["quant"] = ref.quant_fields
    if ref.plan_options and plan == "mixed":
        base["plan_options"] = ref.plan_options
    for draw in draws:
        quantized = None
        for row in [UNRECOVERED, *rows]:
            recovery = None
            if row != UNRECOVERED:  # the draw seeds the recovery; a variant's "seed" is added to it
                seed = draw + rows[row].get("seed", 0)
                recovery = RecoveryConfig(**{**rows[row], "seed": seed, **_steps(steps)})
            setting = {**base, "bits": bits, "plan": plan, "draw": draw}
            setting["recovery"] = recovery.to_json_dict() if recovery else None
            if group.get(row, draw, setting) is not None:
                continue
            quantized = quantized if quantized is not None else ref.quantized(bits, plan, draw)
            model, facts = copy.deepcopy(quantized), {}
            if recovery is not None:
                report = recover(model, build_model(ref.spec), ref.calib(draw), recovery, progress=False)
                facts = {"steps": report.steps, "seconds": report.seconds, "curve": list(report.curve)}
            started = time.perf_counter()
            result = evaluate(model, ref.dev(), progress=False)
            stored = group.put(row, draw, setting, result, **facts)
            seconds = f"{facts['seconds']:.0f} s recovery, " if facts else ""
            took = f"{seconds}{time.perf_counter() - started:.0f} s eval"
            print(f"{group.folder.name} {row:<14} draw {draw}: top-1 {stored['top1']:6.2f}% ({took})", flush=True)
    return group


def float_row(ref: ReferenceModel, out: Path) -> dict:
    """The float model's top-1 and per-image correctness, measured once per model (``<out>/<model>/float.json``)."""
    group = Measurements(out, ref.name)
    setting = {"model": ref.name, "limit": ref.limit, "threads": torch.get_num_threads()}
    stored = group.get(FLOAT, None, setting)
    return stored or group.put(FLOAT, None, setting, evaluate(build_model(ref.spec), ref.dev(), progress=False))


def stored_float_row(ref: ReferenceModel, out: Path) -> dict:
    """The float row as stored, whatever its setting (``--stored-only``)."""
    path = Measurements(out, ref.name).path(FLOAT, None)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run once without --stored-only to measure the float model")
    return json.loads(path.read_text())


def stored_name(row: str, fields: dict[str, Any]) -> str:
    """The name a row is stored and shown under: with what it learned when that is not the library's default
    (rows measured when the default also learned the rounding are ``…, learning rounding``)."""
    learn = RecoveryConfig(**fields).learn
    if learn == DEFAULT_LEARN:
        return row
    if set(learn) == {"rounding", *DEFAULT_LEARN}:
        return f"{row}, learning rounding"
    return f"{row}, learning {'+'.join(learn)}"


def _steps(steps: int | None) -> dict[str, int]:
    return {} if steps is None else {"steps": steps}


def _stored(group: Measurements) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(group.folder.glob("*.json"))}


def table(
    group: Measurements,
    rows: dict[str, dict[str, Any]],
    draws: list[int],
    reference: dict,
    plain: Measurements | None = None,
) -> str:
    """Markdown: per row the top-1 of every draw, the mean, the gaps to unrecovered and float, steps and time.

    ``plain``: the same (model, width, plan) quantized without ``--quant``; each row then also gets its
    paired gap to the same row there, over the draws both have.
    """
    stored = _stored(group)
    plain_rows = _stored(plain) if plain is not None else None
    versus = " − without |" if plain_rows is not None else ""
    head = (
        "| row | " + " | ".join(f"draw {d}" for d in draws) + f" | mean | − unrecovered |{versus} − float | steps | s |"
    )
    lines = [head, "|---|" + "---:|" * (len(draws) + 5 + bool(versus))]
    for row in [UNRECOVERED, *rows]:
        have = {d: stored[f"{_slug(row)}@{d}"] for d in draws if f"{_slug(row)}@{d}" in stored}
        if not have:
            continue
        correct = {d: unpack_correct(r) for d, r in have.items()}
        cells = [f"{have[d]['top1']:.2f}" if d in have else "–" for d in draws]
        cells.append(f"{100 * np.mean([c.mean() for c in correct.values()]):.2f}")
        unrecovered = {d: stored.get(f"{_slug(UNRECOVERED)}@{d}") for d in have}
        base = {d: unpack_correct(row) for d, row in unrecovered.items() if row is not None}
        if row != UNRECOVERED and base:
            cells.append(_gap(np.array([correct[d] for d in base]), np.array(list(base.values()))))
        else:
            cells.append("")
        if plain_rows is not None:
            same = {d: plain_rows[f"{_slug(row)}@{d}"] for d in have if f"{_slug(row)}@{d}" in plain_rows}
            paired = [(correct[d], unpack_correct(r)) for d, r in same.items()]
            cells.append(_gap(*map(np.array, zip(*paired, strict=True))) if paired else "")
        cells.append(_gap(np.array(list(correct.values())), unpack_correct(reference)[None]))
        steps = {r.get("steps") for r in have.values()} - {None}
        cells.append(", ".join(map(str, sorted(steps))))
        seconds = [r["seconds"] for r in have.values() if "seconds" in r]
        cells.append(f"{sum(seconds) / len(seconds):.0f}" if seconds else "")
        label = f"recovered: {row}" if row != UNRECOVERED else row
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _gap(model: np.ndarray, reference: np.ndarray) -> str:
    if reference.shape[0] == 1:
        reference = np.repeat(reference, model.shape[0], axis=0)
    mean, low, high = mean_gap(model, reference)
    return f"{mean:+.2f} ({low:+.2f} … {high:+.2f})"


def _heading(section: str) -> str:
    """A section's model, width and plan: its ``### …`` title up to the parenthesis."""
    return section.splitlines()[0].split(" (")[0]


def write_doc(doc: Path, sections: list[str]) -> None:
    """Put the tables between the markers of ``doc``, replacing those of the same model, width and plan and
    keeping the others (so runs over different models or widths add up); a new file gets only the markers."""
    text = doc.read_text() if doc.is_file() else f"# Recovery\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise SystemExit(f"{doc} lacks the markers {START} … {END}; add them where the tables belong")
    before, rest = text.split(START, 1)
    current, after = rest.split(END, 1)
    kept = ["### " + part.strip() + "\n" for part in current.split("### ")[1:]]
    new = {_heading(section) for section in sections}
    merged = [section for section in kept if _heading(section) not in new] + sections
    replace_text(doc, f"{before}{START}\n\n" + "\n".join(merged) + f"\n{END}{after}")


def _json_object(
    parser: argparse.ArgumentParser, option: str, text: str, known: list[str] | tuple[str, ...], example: str
) -> dict[str, Any]:
    """``text`` as a JSON object whose keys are all ``known``, checked before anything is measured: one-line errors."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"{option} {text!r} is not JSON ({error.msg}); give an object such as '{example}'")
    if not isinstance(fields, dict):
        parser.error(f"{option} {text!r} must be a JSON object of setting names and values")
    unknown = sorted(set(fields) - set(known))
    if unknown:
        parser.error(f"{option} cannot set {unknown[0]!r}; it sets some of {', '.join(known)}")
    return fields


def _fields(
    parser: argparse.ArgumentParser,
    option: str,
    text: str,
    config: type,
    example: str,
    reserved: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``text`` as a JSON object of ``config``'s fields but ``reserved`` (set by other options) that ``config``
    accepts; ``example`` is shown when ``text`` is not JSON."""
    known = [field.name for field in dataclasses.fields(config) if field.name not in reserved]
    fields = _json_object(parser, option, text, known, example)
    try:
        config(**fields)
    except LrpqError as error:
        parser.error(f"{option} {text!r}: {error}")
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCES), default=sorted(REFERENCES))
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3], help="W=A widths (default 4 3)")
    parser.add_argument("--plans", nargs="+", choices=("fixed", "mixed"), default=["fixed", "mixed"])
    parser.add_argument(
        "--losses",
        nargs="*",
        default=list(LOSSES),
        help=f"single losses (default all {len(LOSSES)}; none: the unrecovered rows alone)",
    )
    parser.add_argument("--combos", nargs="*", default=[], help="more loss specs, e.g. kd+mse")
    parser.add_argument(
        "--variant",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "JSON"),
        help='a row of other RecoveryConfig fields, e.g. rounding \'{"learn": ["rounding"], "lr_rounding": 0.001}\'',
    )
    parser.add_argument(
        "--learn",
        nargs="+",
        choices=LEARNABLE,
        help=f"what every row learns unless its variant says (default {' '.join(DEFAULT_LEARN)})",
    )
    parser.add_argument(
        "--quant",
        nargs=2,
        metavar=("NAME", "JSON"),
        help="QuantConfig fields of every quantized draw, stored and titled under NAME, e.g. "
        '"input-weighted weight ranges" \'{"weight_range_metric": "inputs"}\'',
    )
    parser.add_argument(
        "--plan-options",
        metavar="JSON",
        help="keyword arguments of lrpq.allocation.mixed_plan for the mixed plans, stored under --quant's NAME, "
        "e.g. '{\"min_wbits\": 4}'",
    )
    parser.add_argument("--draws", nargs="+", type=int, default=[0, 1, 2], help="calibration seeds")
    parser.add_argument("--steps", type=int, help=f"recovery steps (default {RecoveryConfig.steps})")
    parser.add_argument("--limit", type=int, help="an evenly spaced subset of each dev folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stored-only", action="store_true", help="write the tables from stored rows, measure nothing")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "recovery")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "recovery-table")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "recovery.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    named = [(spec, {"loss": spec}) for spec in [*args.losses, *args.combos]]
    named += [
        (name, _fields(parser, "--variant", text, RecoveryConfig, '{"drop": 0.5}')) for name, text in args.variant
    ]
    quant = None
    if args.quant:  # --bits sets the widths
        name, text = args.quant
        example = '{"weight_range_metric": "inputs"}'
        quant = (name, _fields(parser, "--quant", text, QuantConfig, example, reserved=("wbits", "abits")))
    plan_options = None
    if args.plan_options:
        plan_options = _json_object(parser, "--plan-options", args.plan_options, PLAN_OPTIONS, '{"min_wbits": 4}')
    if plan_options and not args.quant:
        parser.error("--plan-options needs --quant NAME JSON to store its rows under (JSON may be '{}')")
    learn = {} if args.learn is None else {"learn": args.learn}
    # Stored names first: a variant "nmse" learning the rounding is another row than the loss "nmse".
    rows = {stored_name(name, {**learn, **fields}): {**learn, **fields} for name, fields in named}
    sections = []
    for name in args.models:
        ref = ReferenceModel(name, REFERENCES[name], args.cache, args.limit, quant, plan_options)
        reference = stored_float_row(ref, args.out) if args.stored_only else float_row(ref, args.out)
        for bits in args.bits:
            for plan in args.plans:
                if args.stored_only:
                    group = Measurements(args.out, ref.group(bits, plan))
                else:
                    group = measure(ref, bits, plan, rows, args.draws, args.steps, args.out)
                plain = Measurements(args.out, ref.plain_group(bits, plan)) if ref.quant_name else None
                dev = f"{ref.limit} dev images" if ref.limit else "all dev images"
                setting = f"W{bits}A{bits} {plan}" + (f", {ref.quant_name}" if ref.quant_name else "")
                title = f"### {REFERENCES[name].label}, {setting} ({dev}; float {reference['top1']:.2f})"
                sections.append(f"{title}\n\n{table(group, rows, args.draws, reference, plain)}")
                print(sections[-1], flush=True)
    write_doc(args.doc, sections)


if __name__ == "__main__":
    main()
