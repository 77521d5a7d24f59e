"""``lrpq`` command line: argument parsing and printing only; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import FrameType

import torch

from lrpq import bench
from lrpq.allocation.budget import BUDGETS, quantized_model_cost
from lrpq.allocation.from_relevance import DEFAULT_RELEVANCE_IMAGES, plan_from_scores, widths_for
from lrpq.allocation.noise_measurement import DEFAULT_NOISE_IMAGES
from lrpq.allocation.plans import (
    ALLOCATORS,
    DEFAULT_ALLOCATOR,
    DEFAULT_MIN_WBITS,
    DEFAULT_RELEVANCE_SCALE,
    DEFAULT_RELEVANCE_WEIGHT,
    NOISE_METHODS,
    RELEVANCE_ALLOCATORS,
    RELEVANCE_SCALES,
    check_request,
    default_budget,
    mixed_plan,
    weight_floor,
)
from lrpq.allocation.solvers import ALLOCATORS as RELEVANCE_RULES
from lrpq.api import quantize
from lrpq.config import FOLDED_GRIDS, RANGE_METRICS, BitPlan, QuantConfig
from lrpq.data import (
    draw_calibration_set,
    load_calibration_images,
    make_loader,
    read_calibration_list,
    unnormalize,
)
from lrpq.devices import add_device_argument, loader_options, resolve_device
from lrpq.errors import LrpqError
from lrpq.evaluate import Comparison, EvalResult, compare, evaluate
from lrpq.models import ModelSpec, build_model, resolve_model
from lrpq.outputs import staged_dir, staged_file
from lrpq.prune.cli import add_prune_parser
from lrpq.prune.cost import model_cost
from lrpq.prune.run_dir import is_pruned_run
from lrpq.recovery import DEFAULT_LOSS as DEFAULT_RECOVERY_LOSS
from lrpq.recovery import RecoveryConfig, RecoveryReport, recover
from lrpq.relevance import LayerScores, RelevanceError, compute_layer_scores, relevance_map
from lrpq.relevance.report import REPORT_KIND, write_report_files
from lrpq.runs import has_run_files, load_run, staged_run_dir, write_run

CLI_MIN_BITS, CLI_MAX_BITS = 3, 8
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # the shell's convention


def _bits(text: str) -> int | float:
    """A bit width, or a fractional mean-bits target (3.5) that only a budgeted allocator can meet."""
    try:
        bits = float(text)
    except ValueError:
        bits = math.nan
    if not CLI_MIN_BITS <= bits <= CLI_MAX_BITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a bit width lrpq accepts: use {CLI_MIN_BITS} to {CLI_MAX_BITS}"
        )
    return int(bits) if bits.is_integer() else bits


def _widths(args: argparse.Namespace, wbits: float, abits: float) -> tuple[int, int]:
    """The widths a mixed plan may use: --widths, checked against the targets, or the default range."""
    return widths_for(wbits, abits, tuple(args.widths) if args.widths else None)


def _targets(args: argparse.Namespace) -> tuple[int | float, int | float]:
    """--wbits and --abits (which defaults to --wbits) as mean bits; a fractional mean needs --mixed."""
    targets = args.wbits, args.abits if args.abits is not None else args.wbits
    fractional = [bits for bits in targets if not float(bits).is_integer()]
    if fractional and not getattr(args, "mixed", True):
        raise LrpqError(
            f"{fractional[0]} bits is a mean no single width has: pass --mixed to spread it over the layers, "
            "or use whole bits"
        )
    return targets


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _image_folder(args: argparse.Namespace) -> str:
    folder = args.calib_data or os.environ.get("LRPQ_CALIB_DATA")
    if folder is None:
        raise LrpqError("calibration images are needed: pass --calib-data DIR (an ImageFolder) or set LRPQ_CALIB_DATA")
    return folder


def _calibration_images(args: argparse.Namespace, spec: ModelSpec) -> torch.Tensor:
    """Seeded draw from --calib-data, or a fixed list (paths relative to --calib-data)."""
    folder = _image_folder(args)
    if args.calib_list:
        paths = read_calibration_list(args.calib_list, folder)
    else:
        paths = draw_calibration_set(folder, args.calib_size, args.seed)
    return load_calibration_images(paths, spec.data_config)


def _relevance_images(args: argparse.Namespace, spec: ModelSpec) -> torch.Tensor:
    """--relevance-images images of the calibration folder (drawn with --seed), for the relevance allocators."""
    paths = draw_calibration_set(_image_folder(args), args.relevance_images, args.seed)
    return load_calibration_images(paths, spec.data_config)


def _quant_config(args: argparse.Namespace, wbits: float, abits: float) -> QuantConfig:
    """The run's config; with fractional targets, layers outside the plan take them rounded up."""
    config = QuantConfig(
        wbits=math.ceil(wbits),
        abits=math.ceil(abits),
        ln_reparam=not args.no_ln_reparam,
        post_gelu_reparam=not args.no_gelu_reparam,
        center_keys=not args.no_key_centring,
        rotate_heads=not args.no_head_rotation,
        rotate_hidden=not args.no_hidden_rotation,
        gptq=not args.no_gptq,
        bias_correction=args.bias_correction,
        range_metric=args.range_metric,
        clip_k=None if args.no_crl else args.clip_k,
        folded_grid=args.folded_grid,
    )
    if args.bit_plan:
        config = config.with_plan(BitPlan.load(args.bit_plan))
    return config


def _default_run_dir(spec: ModelSpec, wbits: float, abits: float, mixed: bool) -> Path:
    name = Path(spec.source).stem if spec.source.endswith(".json") else spec.source
    return Path("runs") / f"{name}-w{wbits}a{abits}{'-mixed' if mixed else ''}"


def _recovery_config(args: argparse.Namespace) -> RecoveryConfig | None:
    """--recover's config (a bad loss spec is refused here, before any work), or None without it."""
    if args.recover is None:
        if args.recover_steps is not None:
            raise LrpqError("--recover-steps sets how long --recover trains: pass it with --recover")
        if args.recover_drop is not None:
            raise LrpqError("--recover-drop sets QDrop while --recover trains: pass it with --recover")
        return None
    steps = {} if args.recover_steps is None else {"steps": args.recover_steps}
    drop = {} if args.recover_drop is None else {"drop": args.recover_drop}
    return RecoveryConfig(loss=args.recover, seed=args.seed, **steps, **drop)


def _recovery_summary(report: RecoveryReport | None, config: RecoveryConfig | None) -> dict[str, object]:
    """Flat summary entries (summary.txt shows flat values only) saying whether and how the run was recovered."""
    if report is None or config is None:
        return {"recovered": False}
    return {
        "recovered": True,
        "recovery_loss": report.loss,
        "recovery_steps": report.steps,
        "recovery_drop": config.drop,
        "recovery_learned": ",".join(config.learn),
        "recovery_seconds": report.seconds,
        "recovery_loss_first": round(report.first_loss, 6),
        "recovery_loss_last": round(report.last_loss, 6),
        "recovery_changed_levels": report.changed_levels,
    }


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.mixed and args.bit_plan:
        raise LrpqError("--mixed computes a bit plan, --bit-plan gives one: pass only one of them")
    for flag in ("widths", "min_wbits", "budget", "scores"):
        if getattr(args, flag) and not args.mixed:
            raise LrpqError(f"--{flag.replace('_', '-')} shapes a mixed plan: pass it with --mixed")
    wbits, abits = _targets(args)
    recovery = _recovery_config(args)
    budget = args.budget or default_budget(args.allocator)
    if args.mixed:
        check_request(args.allocator, budget, wbits, abits)
    widths = _widths(args, wbits, abits) if args.mixed else None
    if args.min_wbits is not None and args.allocator == "paper":
        raise LrpqError(
            "--min-wbits bounds the measured and exact plans; the paper rule moves one bit around the target"
        )
    min_wbits = DEFAULT_MIN_WBITS if args.min_wbits is None else args.min_wbits
    floor = weight_floor(wbits, widths, min_wbits) if args.mixed else None  # checked before any work
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    spec = resolve_model(args.model, args.checkpoint)
    config = _quant_config(args, wbits, abits)
    out_dir = args.out or _default_run_dir(spec, wbits, abits, args.mixed)
    # The whole run happens in a staging folder beside --out, made now: an unusable --out fails before any
    # work, and any failure (an error, Ctrl-C, SIGTERM) removes it.
    with staged_run_dir(out_dir, args.overwrite) as staging:
        calib = _calibration_images(args, spec)
        model = build_model(spec).to(device)
        cost = model_cost(model, spec.data_config["input_size"])  # of the float (possibly pruned) model
        started = time.perf_counter()
        mixed = None
        if args.mixed:
            relevance = args.allocator in RELEVANCE_ALLOCATORS and not args.scores
            mixed = mixed_plan(
                model,
                config,
                calib,
                allocator=args.allocator,
                budget=budget,
                wbits=wbits,
                abits=abits,
                widths=widths,
                relevance_images=_relevance_images(args, spec) if relevance else None,
                scores=LayerScores.load(args.scores) if args.scores else None,
                noise_images=args.noise_images,
                noise_method=args.noise_method,
                relevance_weight=args.relevance_weight,
                relevance_scale=args.relevance_scale,
                min_wbits=min_wbits,
            )
            config = config.with_plan(mixed.plan)
        quantize(model, config, calib, batch_size=args.batch_size)
        calibration_seconds = round(time.perf_counter() - started, 2)
        report = recover(model, build_model(spec).to(device), calib, recovery) if recovery is not None else None
        summary = {
            "model": spec.source,
            "timm_name": spec.timm_name,
            "wbits": config.wbits,
            "abits": config.abits,
            "ln_reparam": config.ln_reparam,
            "post_gelu_reparam": config.post_gelu_reparam,
            "center_keys": config.center_keys,
            "rotate_heads": config.rotate_heads,
            "rotate_hidden": config.rotate_hidden,
            "clip_k": config.clip_k,
            "folded_grid": config.folded_grid,
            "gptq": config.gptq,
            "bias_correction": config.bias_correction,
            "range_metric": config.range_metric,
            "calibration_images": int(calib.shape[0]),
            "calibration_batch_size": args.batch_size,
            "seed": args.seed,
            "calibration_seconds": calibration_seconds,
            **_recovery_summary(report, recovery),
            **quantized_model_cost(model, config, (wbits, abits), tuple(calib.shape[1:])),
            **cost.to_json_dict(),
        }
        if mixed is not None:
            summary |= {"allocator": mixed.allocator, "budget": mixed.budget, "target_wbits": wbits}
            summary |= {"target_abits": abits, "widths": widths}
            if mixed.allocator != "paper":
                summary["min_wbits"] = floor
            if mixed.allocator == "relevance":
                summary |= {"relevance_weight": args.relevance_weight, "relevance_scale": args.relevance_scale}
            if mixed.scores is not None:
                summary["relevance_images"] = mixed.scores.num_images
                mixed.scores.save(staging / "scores.json")
                mixed.scores.save_csv(staging / "scores.csv")
            if mixed.noise is not None:
                summary |= {"noise_images": mixed.noise.num_images, "noise_method": args.noise_method}
                mixed.noise.save(staging / "noise.json")
        sections = {"recovery": recovery.to_json_dict()} if recovery is not None else None
        summary = write_run(staging, model, spec, config, summary, sections)
    recovered = f", recovered by {report.loss} in {report.seconds} s" if report is not None else ""
    print(
        f"quantized {spec.source} to W{wbits}A{abits} in {calibration_seconds} s{recovered}, "
        f"packed {summary['packed_bytes']} bytes → {out_dir}"
    )
    return 0


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


def _heat_map(model: torch.nn.Module, image: torch.Tensor, method: str) -> torch.Tensor:
    """``auto``: attention rollout where the model has a class token (clearer on ViTs), else pixel LRP."""
    if method != "auto":
        return relevance_map(model, image, method=method)
    try:
        return relevance_map(model, image, method="attribution")
    except RelevanceError:
        return relevance_map(model, image, method="lrp")


def cmd_relevance(args: argparse.Namespace) -> int:
    wbits, abits = _targets(args)
    fractional = [bits for bits in (wbits, abits) if not float(bits).is_integer()]
    if args.allocator == "paper" and fractional:
        raise LrpqError(
            f"{fractional[0]} bits is a mean the paper rule cannot reach (it moves whole bits); use --allocator exact"
        )
    widths = _widths(args, wbits, abits)
    device = resolve_device(args.device)
    spec = resolve_model(args.model, args.checkpoint)
    with staged_dir(args.out, what=REPORT_KIND) as staging:  # --out is checked and usable before any work
        model = build_model(spec).to(device)
        paths = draw_calibration_set(args.data, args.num_images, args.seed)
        images = load_calibration_images(paths, spec.data_config)
        scores = compute_layer_scores(model, images, stop_tau=args.stop_tau)
        plan = plan_from_scores(model, scores, wbits=wbits, abits=abits, allocator=args.allocator, widths=widths)
        heatmaps = [
            (
                unnormalize(image, spec.data_config),
                _heat_map(model, image, args.map_method),
                f"{path.parent.name}/{path.name}",
            )
            for image, path in zip(images[: args.heatmaps], paths[: args.heatmaps], strict=True)
        ]
        write_report_files(staging, scores, plan, heatmaps)
    print(f"scored {len(scores.scores)} layers on {scores.num_images} images of {args.data} → {args.out}")
    return 0


def _add_widths_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--widths",
        nargs=2,
        type=int,
        metavar=("LO", "HI"),
        help="widths a mixed plan may use (default 3–6, widened to one bit either side of the target)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrpq", description="Mixed-precision PTQ for vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize a model and write a run directory")
    q.add_argument("model", help="alias (deit_s, swin_t, …), timm model name, or model card JSON")
    q.add_argument("--checkpoint", help="weights file to load instead of timm's pretrained weights")
    q.add_argument(
        "--wbits",
        type=_bits,
        required=True,
        help="weight bits (3–8); with --mixed the mean, which the exact and sensitivity allocators also "
        "take fractional (3.5)",
    )
    q.add_argument("--abits", type=_bits, help="activation bits (3–8, as --wbits; default: --wbits)")
    q.add_argument("--calib-data", help="ImageFolder to draw calibration images from (or $LRPQ_CALIB_DATA)")
    q.add_argument("--calib-list", help="fixed list of calibration images, relative to --calib-data")
    q.add_argument("--calib-size", type=_positive_int, default=32, help="calibration images to draw (default 32)")
    q.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="calibration images per forward pass (default 32); fewer use less memory, and each "
        "activation range is then the mean of the per-batch ranges",
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    q.add_argument(
        "--no-ln-reparam",
        action="store_true",
        help="skip RepQ-ViT's post-LayerNorm reparameterization (the channel fold into LayerNorm and the next Linear)",
    )
    q.add_argument(
        "--no-gelu-reparam", action="store_true", help="skip the channel fold of post-GELU activations (fc2 inputs)"
    )
    q.add_argument(
        "--no-key-centring", action="store_true", help="leave the keys of q·kᵀ as they are (no shift through qkv)"
    )
    q.add_argument(
        "--no-head-rotation",
        action="store_true",
        help="leave attention heads unrotated (no Hadamard rotation of q, k and v through qkv and proj)",
    )
    q.add_argument(
        "--no-hidden-rotation",
        action="store_true",
        help="leave fc2 inputs unrotated (no online Hadamard rotation of the post-GELU activation)",
    )
    q.add_argument(
        "--no-gptq", action="store_true", help="round weights to the nearest level (RepQ-ViT) instead of by GPTQ"
    )
    q.add_argument(
        "--bias-correction",
        action="store_true",
        help="set every layer's quantized output mean back to its float mean (two more passes)",
    )
    q.add_argument(
        "--range-metric",
        choices=RANGE_METRICS,
        default="mse",
        help="compare activation ranges by their squared error (mse) or by the first-order error they cause "
        "at the logits (output: one more backward pass)",
    )
    q.add_argument(
        "--clip-k",
        type=_positive_float,
        default=QuantConfig.clip_k,
        help=f"CRL: clip channel scales and zero points to mean ± k·std before folding (default: {QuantConfig.clip_k})",
    )
    q.add_argument("--no-crl", action="store_true", help="fold without CRL's clipping (RepQ-ViT's fold)")
    q.add_argument(
        "--folded-grid",
        choices=FOLDED_GRIDS,
        default=QuantConfig.folded_grid,
        help="per-tensor grid of a folded activation: the folds' (clipped) target grid, or a percentile refit "
        f"(default: {QuantConfig.folded_grid})",
    )
    q.add_argument("--bit-plan", help="per-layer bits JSON (e.g. bits.json of an earlier run)")
    q.add_argument("--mixed", action="store_true", help="choose per-layer bits (mean = W/A bits) by --allocator")
    q.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default=DEFAULT_ALLOCATOR,
        help="how --mixed chooses widths: relevance (measured noise weighted by LRP relevance), sensitivity "
        "(measured noise), exact (relevance alone, solved exactly), paper (LRP-QViT's rule); "
        f"default {DEFAULT_ALLOCATOR}",
    )
    q.add_argument(
        "--budget",
        choices=BUDGETS,
        help="what a mixed plan may not exceed, the fixed-bit plan's: layers (mean width), size (weight bits "
        "per parameter) or bops (bit-operations, and size); default bops (layers for the paper rule)",
    )
    _add_widths_argument(q)
    q.add_argument(
        "--min-wbits",
        type=int,
        metavar="N",
        help="narrowest weight width a plan may give (not the paper rule, which moves one bit around the "
        f"target); at most the target (default: {DEFAULT_MIN_WBITS or 'the lowest of --widths'})",
    )
    q.add_argument(
        "--noise-images",
        type=_positive_int,
        default=DEFAULT_NOISE_IMAGES,
        help=f"calibration images the layer noise is measured on (default {DEFAULT_NOISE_IMAGES}, "
        "at most the calibration set)",
    )
    q.add_argument(
        "--noise-method",
        choices=NOISE_METHODS,
        default="estimate",
        help="layer noise to first order in one sweep (estimate), or one forward per layer and width (exact, slow)",
    )
    q.add_argument(
        "--relevance-weight",
        type=float,
        default=DEFAULT_RELEVANCE_WEIGHT,
        help=f"γ of the relevance allocator: a layer's noise counts (relevance share / mean)^γ times "
        f"(default {DEFAULT_RELEVANCE_WEIGHT}; 0 is the sensitivity allocator)",
    )
    q.add_argument(
        "--relevance-scale",
        choices=RELEVANCE_SCALES,
        default=DEFAULT_RELEVANCE_SCALE,
        help="the relevance allocator compares a layer's relevance with its block's layers (block, LRP-QViT's "
        f"normalisation) or with its own kind in every block (kind) (default {DEFAULT_RELEVANCE_SCALE})",
    )
    q.add_argument(
        "--relevance-images",
        type=_positive_int,
        default=DEFAULT_RELEVANCE_IMAGES,
        help=f"images (from --calib-data) to score layers on (default {DEFAULT_RELEVANCE_IMAGES})",
    )
    q.add_argument("--scores", help="layer scores JSON from `lrpq relevance` instead of computing them")
    q.add_argument(
        "--recover",
        nargs="?",
        const=DEFAULT_RECOVERY_LOSS,
        metavar="LOSS[+LOSS…]",
        help="after calibration, train rounding, activation scales, LayerNorm and biases against the float model "
        f"on the calibration images with this distillation loss (e.g. kd:0.5+mse; default {DEFAULT_RECOVERY_LOSS})",
    )
    q.add_argument(
        "--recover-steps",
        type=_positive_int,
        help=f"optimisation steps of --recover (default {RecoveryConfig.steps})",
    )
    q.add_argument(
        "--recover-drop",
        type=float,
        metavar="P",
        help="QDrop while --recover trains: each activation value stays float with probability P, in [0, 1) "
        f"(default {RecoveryConfig.drop}; 0.5 helps at 3 bits, docs/recovery.md)",
    )
    q.add_argument("--out", help="run directory to write (default runs/<model>-w<W>a<A>)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    add_device_argument(q)
    q.set_defaults(func=cmd_quantize)

    e = commands.add_parser("eval", help="top-1/top-5 of a float model or a run directory on an ImageFolder")
    e.add_argument("model", help="run directory, alias, timm model name, or model card JSON")
    e.add_argument("--checkpoint", help="weights file for a float model")
    e.add_argument("--data", required=True, help="ImageFolder-style directory (<class>/<image>)")
    e.add_argument("--batch-size", type=_positive_int, default=64)
    e.add_argument("--limit", type=_positive_int, help="evaluate an evenly spaced subset of this many images")
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

    r = commands.add_parser("relevance", help="per-layer relevance scores, chosen bits and heat maps")
    r.add_argument("model", help="alias, timm model name, or model card JSON")
    r.add_argument("--checkpoint", help="weights file to load instead of timm's pretrained weights")
    r.add_argument("--data", required=True, help="ImageFolder to draw images from (training images, ideally)")
    r.add_argument("--num-images", type=_positive_int, default=DEFAULT_RELEVANCE_IMAGES)
    r.add_argument("--stop-tau", type=float, help="stop early once the layer ranking is this stable (Kendall τ)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--wbits", type=_bits, default=4, help="mean weight bits of the plan drawn on the chart")
    r.add_argument("--abits", type=_bits, help="mean activation bits of the plan (default: --wbits)")
    r.add_argument("--allocator", choices=RELEVANCE_RULES, default="paper")
    _add_widths_argument(r)
    r.add_argument("--heatmaps", type=int, default=4, help="images to draw a relevance heat map for")
    r.add_argument("--map-method", choices=("auto", "attribution", "lrp"), default="auto")
    r.add_argument("--out", required=True, help="folder to write (must not exist)")
    add_device_argument(r)
    r.set_defaults(func=cmd_relevance)

    add_prune_parser(commands)

    b = commands.add_parser("bench", help="calibration, relevance, inference, memory and size as ratios to float")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run_from_args)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised as Ctrl-C raises KeyboardInterrupt (and like it no ``Exception``), so clean-up code runs."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` while a command runs, unless SIGTERM already has a handler or is ignored.

    Without this, SIGTERM kills the process at once and leaves its staging folder behind.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error is one line and status 2.

    Ctrl-C and SIGTERM are one line too, with the statuses a shell gives a process they end (130, 143), once
    the command has removed what it had begun to write.
    """
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_raises():
            return args.func(args)
    except LrpqError as error:
        print(f"lrpq {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrpq {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"lrpq {args.command}: terminated", file=sys.stderr)
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
