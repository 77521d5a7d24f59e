"""Structured pruning of the shared reference models: every criterion, with and without recovery, then quantized.

For each reference model, at ``--heads 0.25 --mlp 0.3`` (fractions removed), on the fixed 32-image
calibration lists of ``calib/`` (or ``--calib-seed S``: another draw of as many from the calib folder):

- ``float``: the unpruned model;
- one row per criterion × ranking (``--rankings``) × recovery (off, on): top-1 on the dev folder with
  the paired 95 % interval against the ``lrp`` row of the same ranking and recovery, heads and hidden
  channels kept, parameters and FLOPs (multiply-accumulates per image);
- ``magnitude``: unstructured magnitude pruning of the block weights to the share the per-block
  structured rows remove (reported as sparsity: dense FLOPs do not change);
- pruned-then-quantized rows: the best recovered row of the first ranking (highest top-1) saved as a
  pruned card and quantized through ``lrpq quantize CARD --wbits W --mixed`` at W6A6 and W4A4, beside
  the unpruned model quantized the same way, with the packed size of each.

Each row is stored in ``results/pruning/<model>.json`` with its setting and per-image correctness as
soon as it is measured; a re-run skips rows stored with the same setting (``--rows`` re-runs named
ones), so an interrupted run resumes. The tables go to ``docs/pruning.md`` between the markers of
each model (the rest of the document is left as it is). Pruned cards for the quantized rows are kept
under ``runs/prune_table/``.

    python scripts/prune_table.py                                   # both models, whole dev folders
    python scripts/prune_table.py --models ref-A --limit 500        # a quick check
    python scripts/prune_table.py --models ref-B --rows "lrp, per-block, recovered"
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from measure import REFERENCES, REPO, SHARED, Reference, pack_correct, unpack_row

from lrpq.allocation.plans import DEFAULT_ALLOCATOR
from lrpq.cli import main as lrpq_main
from lrpq.data import draw_calibration_set, load_calibration_images, make_loader, read_calibration_list
from lrpq.evaluate import EvalResult, PairedGap, evaluate
from lrpq.models import ModelSpec, build_model, resolve_model
from lrpq.outputs import replace_text
from lrpq.prune.cost import model_cost
from lrpq.prune.criteria import CRITERIA, UnitScores, score_units
from lrpq.prune.lrp_scores import DEFAULT_LRP_SCORE
from lrpq.prune.pipeline import PruneConfig, PruneResult, prune
from lrpq.prune.run_dir import save_pruned_run
from lrpq.prune.selection import RANKINGS, select_structure
from lrpq.prune.structure import apply_structure
from lrpq.prune.unstructured import block_linears
from lrpq.runs import load_run

RECOVERY = {False: "no recovery", True: "recovered"}
QUANTIZED = (6, 4)  # W6A6 and W4A4, --mixed
WIDE = 32  # the pruned-then-quantized rows also keep multiples of 32 hidden channels (lrpq.prune.selection)
MAGNITUDE = "magnitude (unstructured)"
DOC = REPO / "docs" / "pruning.md"


def criterion_label(criterion: str, ranking: str, recovery: bool) -> str:
    return f"{criterion}, {ranking}, {RECOVERY[recovery]}"


def wide_label() -> str:
    return f"best criterion, hidden ×{WIDE}, recovered"


def quantized_label(bits: int, variant: str) -> str:
    """``variant``: "unpruned", "pruned" (as the criterion rows) or "wide" (hidden channels ×WIDE)."""
    which = {"unpruned": "unpruned", "pruned": "pruned (best criterion)", "wide": f"pruned (best, hidden ×{WIDE})"}
    return f"W{bits}A{bits} mixed, {which[variant]}"


def variants(hidden_multiple: int) -> list[str]:
    return ["unpruned", "pruned"] + (["wide"] if hidden_multiple != WIDE else [])


def all_labels(rankings: list[str], hidden_multiple: int) -> list[str]:
    rows = ["float"]
    rows += [criterion_label(c, r, rec) for c in CRITERIA for r in rankings for rec in RECOVERY]
    rows += [MAGNITUDE, wide_label()]
    rows += [quantized_label(bits, variant) for variant in variants(hidden_multiple) for bits in QUANTIZED]
    return rows


class Table:
    """One model's stored rows (``results/pruning/<model>.json``), rewritten after every row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def current(self, label: str, setting: dict, forced: list[str]) -> bool:
        return label not in forced and self.rows.get(label, {}).get("setting") == setting

    def store(self, label: str, result: EvalResult, setting: dict, **facts: object) -> None:
        correct = pack_correct(result.correct)
        self.rows[label] = {**result.to_json_dict(), "correct": correct, **facts, "setting": setting}
        replace_text(self.path, json.dumps(self.rows, indent=1) + "\n")
        print(f"{self.path.stem:<6} {label:<48} top-1 {result.top1:6.2f}%", flush=True)


class ReferenceRun:
    """The model, its calibration images and its dev loader, with unit scores computed once per criterion."""

    def __init__(self, ref: Reference, args: argparse.Namespace) -> None:
        self.ref, self.args = ref, args
        self.spec = resolve_model(str(ref.card))
        self.calib_paths = read_calibration_list(ref.calib_list, ref.data / "calib")
        if args.calib_seed is not None:  # as many images as the fixed list, another draw
            self.calib_paths = draw_calibration_set(ref.data / "calib", len(self.calib_paths), args.calib_seed)
        self.calib = load_calibration_images(self.calib_paths, self.spec.data_config)
        self.input_size = tuple(self.spec.data_config["input_size"])
        self.scores: dict[str, UnitScores] = {}
        self.saved: set[Path] = set()  # pruned cards written by this invocation

    def base_setting(self) -> dict:
        args = self.args
        setting = {"limit": args.limit, "calib_seed": args.calib_seed, "heads": args.heads, "mlp": args.mlp}
        return setting | ({"hidden_multiple": args.hidden_multiple} if args.hidden_multiple > 1 else {})

    def evaluate(self, model: torch.nn.Module, spec: ModelSpec | None = None) -> EvalResult:
        spec = spec or self.spec
        loader = make_loader(
            self.ref.data / "dev", spec.data_config, spec.classes, model.num_classes, 100, self.args.limit
        )
        return evaluate(model, loader, progress=False)

    def unit_scores(self, criterion: str) -> UnitScores:
        if criterion not in self.scores:
            model = build_model(self.spec)
            self.scores[criterion] = score_units(model, criterion, self.calib, seed=self.args.seed, progress=False)
        return self.scores[criterion]

    def pruned(self, criterion: str, ranking: str, recovery: bool, hidden_multiple: int | None = None) -> PruneResult:
        config = PruneConfig(
            heads=self.args.heads,
            mlp=self.args.mlp,
            criterion=criterion,
            ranking=ranking,
            hidden_multiple=hidden_multiple or self.args.hidden_multiple,
            recovery=recovery,
            seed=self.args.seed,
        )
        scores = self.unit_scores(criterion)
        return prune(
            build_model(self.spec), config, self.calib, input_size=self.input_size, scores=scores, progress=False
        )


def block_weight_share(run: ReferenceRun) -> float:
    """The share of the block Linears' weights the per-block structured rows remove (magnitude's sparsity)."""
    model = build_model(run.spec)
    before = sum(layer.weight.numel() for layer in block_linears(model).values())
    args = run.args
    structure = select_structure(run.unit_scores("l1"), args.heads, args.mlp, "per-block", args.hidden_multiple)
    after = sum(layer.weight.numel() for layer in block_linears(apply_structure(model, structure)).values())
    return round(1 - after / before, 4)


def _structured_facts(result: PruneResult, seconds: float) -> dict:
    return {
        "params": result.after.params,
        "flops": result.after.flops,
        "heads_kept": sum(k["heads"] for k in result.structure.counts().values()),
        "hidden_kept": sum(k["hidden"] for k in result.structure.counts().values()),
        "prune_seconds": round(seconds, 1),
    }


def _quantize(run: ReferenceRun, card: str, bits: int, out: Path) -> tuple[EvalResult, dict]:
    """``lrpq quantize CARD --wbits B --mixed`` on the table's calibration images, then top-1 of the run."""
    calib_args = ["--calib-list", str(run.ref.calib_list)] if run.args.calib_seed is None else []
    seed = run.args.calib_seed if run.args.calib_seed is not None else run.args.seed
    argv = [
        "quantize", card, "--wbits", str(bits), "--mixed", "--allocator", run.args.allocator,
        "--calib-data", str(run.ref.data / "calib"), *calib_args, "--seed", str(seed), "--out", str(out), "--overwrite",
    ]  # fmt: skip
    if lrpq_main(argv) != 0:
        raise SystemExit(f"lrpq {' '.join(argv)} failed")
    model, spec, _ = load_run(out)
    summary = json.loads((out / "summary.json").read_text())
    facts = {key: summary[key] for key in ("params", "flops", "packed_bytes", "mean_wbits", "mean_abits")}
    return run.evaluate(model, spec), facts


def measure(run: ReferenceRun, table: Table, rankings: list[str], forced: list[str]) -> Iterator[str]:
    """Every row not stored with its current setting; yields each label once it is stored."""
    base = run.base_setting()
    if not table.current("float", {**base, "kind": "float"}, forced):
        model = build_model(run.spec)
        cost = model_cost(model, run.input_size)
        table.store("float", run.evaluate(model), {**base, "kind": "float"}, params=cost.params, flops=cost.flops)
        yield "float"
    for criterion in CRITERIA:
        for ranking in rankings:
            for recovery in RECOVERY:
                label = criterion_label(criterion, ranking, recovery)
                setting = {**base, "criterion": criterion, "ranking": ranking, "recovery": recovery}
                setting |= {"lrp_score": DEFAULT_LRP_SCORE} if criterion == "lrp" else {}
                setting |= {"seed": run.args.seed} if criterion == "random" else {}
                if table.current(label, setting, forced):
                    continue
                started = time.perf_counter()
                result = run.pruned(criterion, ranking, recovery)
                facts = _structured_facts(result, time.perf_counter() - started)
                table.store(label, run.evaluate(result.model), setting, **facts)
                yield label
    sparsity = block_weight_share(run)
    setting = {**base, "kind": "magnitude", "sparsity": sparsity, "scope": "global"}
    if not table.current(MAGNITUDE, setting, forced):
        config = PruneConfig(unstructured=sparsity, recovery=False)
        result = prune(build_model(run.spec), config, input_size=run.input_size, progress=False)
        nonzero = result.after.params - result.sparsity.zeroed
        table.store(MAGNITUDE, run.evaluate(result.model), setting, params=nonzero, flops=result.after.flops)
        yield MAGNITUDE
    yield from measure_quantized(run, table, rankings[0], forced)


def best_criterion(table: Table, ranking: str) -> str:
    """The criterion whose recovered row of ``ranking`` has the highest top-1 (ties: CRITERIA order)."""
    stored = [(table.rows[criterion_label(c, ranking, True)]["top1"], -i, c) for i, c in enumerate(CRITERIA)]
    return max(stored)[2]


def measure_quantized(run: ReferenceRun, table: Table, ranking: str, forced: list[str]) -> Iterator[str]:
    """The best recovered row (and its ×WIDE twin) saved as pruned cards, then quantized by ``lrpq quantize``.

    A hidden width such as ⌈0.7 · 768⌉ = 538 = 2 · 269 has no small Hadamard factors, so quantization's
    hidden rotation stores (and applies) a dense 269 × 269 factor per block; the ×WIDE rows show the cost.
    """
    best = best_criterion(table, ranking)
    folder = REPO / "runs" / "prune_table" / run.ref.card.stem
    pruned_setting = {"criterion": best, "ranking": ranking, "recovery": True}
    cards = {
        "pruned": (folder / f"{best}-{ranking}", run.args.hidden_multiple),
        "wide": (folder / f"{best}-{ranking}-x{WIDE}", WIDE),
    }
    references = {"unpruned": "float", "pruned": criterion_label(best, ranking, True), "wide": wide_label()}
    if "wide" in variants(run.args.hidden_multiple):
        setting = {**run.base_setting(), **pruned_setting, "hidden_multiple": WIDE}
        if not table.current(wide_label(), setting, forced):
            started = time.perf_counter()
            result = run.pruned(best, ranking, True, WIDE)
            facts = _structured_facts(result, time.perf_counter() - started)
            table.store(wide_label(), run.evaluate(result.model), setting, **facts)
            yield wide_label()
    for variant in variants(run.args.hidden_multiple):
        for bits in QUANTIZED:
            label = quantized_label(bits, variant)
            setting = {**run.base_setting(), "wbits": bits, "mixed": True, "allocator": run.args.allocator}
            if variant != "unpruned":
                setting |= {**pruned_setting, "hidden_multiple": cards[variant][1]}
            if table.current(label, setting, forced):
                continue
            source = str(run.ref.card)
            if variant != "unpruned":
                card, multiple = cards[variant]
                if card not in run.saved:  # written once per invocation, so never left from another setting
                    save_pruned_run(card, run.pruned(best, ranking, True, multiple), run.spec, overwrite=True)
                    run.saved.add(card)
                source = str(card)
            result, facts = _quantize(run, source, bits, folder / f"w{bits}-{variant}")
            twin = quantized_label(bits, "unpruned")
            table.store(label, result, setting, **facts, reference=references[variant], twin=twin)
            yield label


# --- markdown -------------------------------------------------------------------------------------------


def _gap(row: dict | None, reference: dict | None) -> str:
    if row is None or reference is None or row["n"] != reference["n"]:
        return "–"
    gap = PairedGap.between(unpack_row(row), unpack_row(reference))
    low, high = gap.confidence_interval()
    return f"{gap.difference:+.2f} ({low:+.2f} … {high:+.2f})"


def model_markdown(name: str, rows: dict[str, dict], rankings: list[str]) -> str:
    ref = REFERENCES[name]
    float_row = rows.get("float")
    if float_row is None:
        return f"### {ref.label}\n\nNo rows measured yet.\n"
    base = float_row["setting"]
    calibration = "the fixed list" if base["calib_seed"] is None else f"draw {base['calib_seed']}"
    lines = [
        f"### {ref.label}",
        "",
        f"{float_row['n']} dev images{' (--limit: an evenly spaced subset, a quick check)' if base['limit'] else ''}; "
        f"{base['heads']:.0%} of heads and {base['mlp']:.0%} of MLP hidden channels "
        f"removed; calibration: {calibration}. "
        f"Float: top-1 {float_row['top1']:.2f} %, {float_row['params'] / 1e6:.3f} M parameters, "
        f"{float_row['flops'] / 1e9:.4f} GFLOPs.",
        "",
        "| criterion | ranking | recovery | top-1 | − lrp (95 % CI) | heads | hidden | params (M) | GFLOPs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for criterion in CRITERIA:
        for ranking in rankings:
            for recovery in RECOVERY:
                row = rows.get(criterion_label(criterion, ranking, recovery))
                if row is None:
                    continue
                reference = rows.get(criterion_label("lrp", ranking, recovery))
                gap = "" if criterion == "lrp" else _gap(row, reference)
                cost = f"{row['params'] / 1e6:.3f} | {row['flops'] / 1e9:.4f}"
                lines.append(
                    f"| {criterion} | {ranking} | {'yes' if recovery else 'no'} | {row['top1']:.2f} | {gap} | "
                    f"{row['heads_kept']} | {row['hidden_kept']} | {cost} |"
                )
    magnitude = rows.get(MAGNITUDE)
    if magnitude is not None:
        lines += [
            "",
            "Unstructured magnitude pruning of the block weights to the share the per-block rows remove "
            f"({magnitude['setting']['sparsity']:.1%} zero, one global threshold, no recovery): "
            f"top-1 {magnitude['top1']:.2f} % ({_gap(magnitude, float_row)} against float), "
            f"{magnitude['params'] / 1e6:.3f} M non-zero parameters, {magnitude['flops'] / 1e9:.4f} GFLOPs "
            "(dense kernels run it at the float cost).",
        ]
    lines += quantized_markdown(rows)
    return "\n".join(lines) + "\n"


def quantized_markdown(rows: dict[str, dict]) -> list[str]:
    """The pruned-then-quantized rows beside the unpruned model quantized the same way."""
    present = [label for label in rows if label.startswith(tuple(f"W{bits}A{bits} mixed" for bits in QUANTIZED))]
    if not present:
        return []
    best = next((rows[label]["setting"] for label in present if "criterion" in rows[label]["setting"]), None)
    which = f"{best['criterion']}, {best['ranking']}, recovered" if best else "not measured yet"
    lines = [
        "",
        f"Pruned then quantized (best criterion: {which}), `lrpq quantize CARD --wbits W --mixed --allocator "
        f"{rows[present[0]]['setting']['allocator']}` on the same calibration images. ×{WIDE}: each block keeps "
        f"its hidden channels rounded up to a multiple of {WIDE} (`--hidden-multiple {WIDE}`)"
        + (f", float top-1 {rows[wide_label()]['top1']:.2f} %" if wide_label() in rows else "")
        + ":",
        "",
        "| row | top-1 | − its float model | − unpruned, same bits | params (M) | GFLOPs | packed bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in present:
        row = rows[label]
        twin = _gap(row, rows.get(row["twin"])) if row["twin"] != label else ""
        lines.append(
            f"| {label} | {row['top1']:.2f} | {_gap(row, rows.get(row['reference']))} | {twin} | "
            f"{row['params'] / 1e6:.3f} | {row['flops'] / 1e9:.4f} | {row['packed_bytes']:,} |"
        )
    return lines


def write_section(doc: Path, marker: str, text: str) -> None:
    """Replace the text between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` (appended if absent)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{text}{end}"
    content = doc.read_text() if doc.is_file() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    content = pattern.sub(lambda _: block, content) if pattern.search(content) else content + f"\n{block}\n"
    replace_text(doc, content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCES), default=sorted(REFERENCES))
    parser.add_argument("--heads", type=float, default=0.25, help="fraction of heads removed (default 0.25)")
    parser.add_argument("--mlp", type=float, default=0.3, help="fraction of MLP hidden channels removed (default 0.3)")
    parser.add_argument(
        "--hidden-multiple", type=int, default=1, help="keep a multiple of N hidden channels per block (default 1)"
    )
    parser.add_argument(
        "--rankings", nargs="+", choices=RANKINGS, default=list(RANKINGS), help="the first also picks the best row"
    )
    parser.add_argument("--limit", type=int, help="evaluate an evenly spaced subset of each dev folder")
    parser.add_argument("--calib-seed", type=int, help="draw the calibration images with this seed, not calib/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random criterion and of torch")
    parser.add_argument(
        "--allocator", default=DEFAULT_ALLOCATOR, help=f"allocator of the --mixed rows (default {DEFAULT_ALLOCATOR})"
    )
    parser.add_argument("--rows", nargs="+", default=[], help="re-run these rows even if stored")
    parser.add_argument("--out", type=Path, help="results folder (default results/pruning, or …/seedS)")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose table sections are rewritten")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as results_table.py)")
    args = parser.parse_args()
    labels = all_labels(args.rankings, args.hidden_multiple)
    unknown = sorted(set(args.rows) - set(labels))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are: {labels}")
    if not SHARED.is_dir():
        parser.error(f"the shared reference models and data are expected at {SHARED}")
    torch.set_num_threads(args.threads)
    out = args.out or REPO / "results" / "pruning" / ("" if args.calib_seed is None else f"seed{args.calib_seed}")
    suffix = "" if args.calib_seed is None else f"-seed{args.calib_seed}"
    for name in args.models:
        torch.manual_seed(args.seed)
        table = Table(out / f"{name}.json")
        for _ in measure(ReferenceRun(REFERENCES[name], args), table, args.rankings, args.rows):
            write_section(args.doc, f"prune-table-{name}{suffix}", model_markdown(name, table.rows, args.rankings))
        write_section(args.doc, f"prune-table-{name}{suffix}", model_markdown(name, table.rows, args.rankings))
        print(model_markdown(name, table.rows, args.rankings))


if __name__ == "__main__":
    main()
