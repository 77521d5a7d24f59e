"""``lrpq eval``: top-1 (and top-5) of a float model or a run directory, optionally paired against float."""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

from lrpq.cli.arguments import positive_int
from lrpq.data import make_loader
from lrpq.devices import add_device_argument, loader_options, resolve_device
from lrpq.errors import LrpqError
from lrpq.evaluate import Comparison, EvalResult, compare, evaluate
from lrpq.models import build_model, resolve_model
from lrpq.outputs import staged_file
from lrpq.prune.run_dir import is_pruned_run
from lrpq.runs import has_run_files, load_run


def _print_result(source: str, result: EvalResult) -> None:
    top5 = f", top-5 {result.top5:.2f}%" if result.top5 is not None else ""
    skipped = f", {result.skipped} unreadable skipped" if result.skipped else ""
    print(f"{source}: top-1 {result.top1:.2f}%{top5} on {result.n} images{skipped} ({result.seconds:.1f} s)")


def _print_comparison(source: str, comparison: Comparison) -> None:
    result, low, high = comparison.result, *comparison.confidence_interval()
    print(
        f"{source}: top-1 {result.top1:.2f}% vs float {comparison.reference.top1:.2f}%: "
        f"{comparison.difference:+.2f} points (95% CI {low:+.2f} to {high:+.2f}); same prediction on "
        f"{comparison.agreement:.2f}%; {comparison.right_only_model} right only when quantized, "
        f"{comparison.right_only_reference} only in float; {result.n} images ({result.seconds:.1f} s)"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    # --json is written through a staging file made now, so an unwritable path fails before the evaluation.
    with staged_file(args.json) if args.json else nullcontext() as json_staging:
        payload = _evaluate(args)
        if json_staging is not None:
            payload |= {"model": args.model, "data": str(args.data)}
            json_staging.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _evaluate(args: argparse.Namespace) -> dict[str, object]:
    """Evaluate (or compare against float) as ``lrpq eval`` asks, print the result and return it as JSON."""
    device = resolve_device(args.device)
    if has_run_files(args.model) and not is_pruned_run(args.model):  # a damaged run is named as one, not a model
        model, spec, _ = load_run(args.model, device)
    elif args.against_float:
        raise LrpqError(
            f"--against-float compares a run directory's quantized model with its float model; "
            f"{args.model} is not a run directory (expected one written by `lrpq quantize`)"
        )
    else:
        spec = resolve_model(args.model, args.checkpoint)
        model = build_model(spec).to(device)
    num_classes = model.num_classes
    options = loader_options(device, args.workers)
    loader = make_loader(
        args.data,
        spec.data_config,
        spec.classes,
        num_classes,
        args.batch_size,
        args.limit,
        options["num_workers"],
        options["pin_memory"],
    )
    if args.against_float:
        comparison = compare(model, build_model(spec).to(device), loader)
        _print_comparison(args.model, comparison)
        payload = comparison.to_json_dict()
    else:
        result = evaluate(model, loader)
        _print_result(args.model, result)
        payload = result.to_json_dict()
    return payload


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``lrpq eval`` on the ``lrpq`` subcommands."""
    e = commands.add_parser("eval", help="top-1/top-5 of a float model or a run directory on an ImageFolder")
    e.add_argument("model", help="run directory, alias, timm model name, or model card JSON")
    e.add_argument("--checkpoint", help="weights file for a float model")
    e.add_argument("--data", required=True, help="ImageFolder-style directory (<class>/<image>)")
    e.add_argument("--batch-size", type=positive_int, default=64)
    e.add_argument("--limit", type=positive_int, help="evaluate an evenly spaced subset of this many images")
    e.add_argument(
        "--workers", type=int, help="data-loading worker processes (default: 0 on the CPU, up to 4 on a GPU)"
    )
    add_device_argument(e)
    e.add_argument(
        "--against-float",
        action="store_true",
        help="also run a run directory's float model on the same images: the paired top-1 gap with a 95%% CI",
    )
    e.add_argument("--json", help="also write the result to this JSON file")
    e.set_defaults(func=cmd_eval)
