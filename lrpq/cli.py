"""``lrpq`` command line: argument parsing and printing only; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lrpq import bench
from lrpq.allocation.from_relevance import DEFAULT_RELEVANCE_IMAGES, plan_from_scores, widths_for
from lrpq.allocation.noise_measurement import (
    DEFAULT_NOISE_IMAGES,
    SENSITIVITY_ALLOCATOR,
    measure_layer_noise,
    plan_from_noise,
)
from lrpq.allocation.solvers import ALLOCATORS, weighted_mean_bits
from lrpq.api import quant_layers, quantize
from lrpq.config import RANGE_METRICS, BitPlan, QuantConfig
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
from lrpq.modules import QuantConv2d, QuantLinear
from lrpq.relevance import LayerScores, RelevanceError, compute_layer_scores, relevance_map
from lrpq.relevance_export import write_relevance_report
from lrpq.runs import check_writable, effective_plan, is_run_dir, load_run, save_run

CLI_MIN_BITS, CLI_MAX_BITS = 3, 8
FRACTIONAL_ALLOCATORS = ("exact", SENSITIVITY_ALLOCATOR)  # the budgeted ones: any mean within the widths


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


def _targets(args: argparse.Namespace, budgeted: Sequence[str], how: str) -> tuple[int | float, int | float]:
    """--wbits and --abits (which defaults to --wbits) as mean bits.

    A fractional mean needs one of the ``budgeted`` allocators; ``how`` tells the user how to ask for one.
    """
    targets = args.wbits, args.abits if args.abits is not None else args.wbits
    fractional = [bits for bits in targets if not float(bits).is_integer()]
    if fractional and args.allocator not in budgeted:
        raise LrpqError(
            f"{fractional[0]} bits is a mean no single width has: pass {how} to spread it over the layers, "
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


def _layer_scores(args: argparse.Namespace, spec: ModelSpec, model: torch.nn.Module) -> LayerScores:
    """Scores from --scores, or computed on --relevance-images images of the calibration folder."""
    if args.scores:
        return LayerScores.load(args.scores)
    paths = draw_calibration_set(_image_folder(args), args.relevance_images, args.seed)
    return compute_layer_scores(model, load_calibration_images(paths, spec.data_config))


def _quant_config(args: argparse.Namespace, wbits: float, abits: float) -> QuantConfig:
    """The run's config; with fractional targets, layers outside the plan take them rounded up."""
    config = QuantConfig(
        wbits=math.ceil(wbits),
        abits=math.ceil(abits),
        crl=not args.no_crl,
        post_gelu_reparam=not args.no_gelu_reparam,
        center_keys=not args.no_key_centring,
        rotate_heads=not args.no_head_rotation,
        rotate_hidden=not args.no_hidden_rotation,
        gptq=not args.no_gptq,
        bias_correction=args.bias_correction,
        range_metric=args.range_metric,
        clip_k=args.clip_k,
    )
    if args.bit_plan:
        config = config.with_plan(BitPlan.load(args.bit_plan))
    return config


def _default_run_dir(spec: ModelSpec, wbits: float, abits: float, mixed: bool) -> Path:
    name = Path(spec.source).stem if spec.source.endswith(".json") else spec.source
    return Path("runs") / f"{name}-w{wbits}a{abits}{'-mixed' if mixed else ''}"


def _budget_summary(model: torch.nn.Module, config: QuantConfig) -> dict[str, float]:
    """Mean bits as the paper counts them (per layer) and weight bits weighted by parameter count."""
    plan = effective_plan(model, config)
    weighted_layers = {
        name: layer for name, layer in quant_layers(model).items() if isinstance(layer, QuantLinear | QuantConv2d)
    }
    weighted_plan = BitPlan({name: plan.layers[name] for name in weighted_layers})
    counts = {name: layer.weight.numel() for name, layer in weighted_layers.items()}
    return {
        "mean_wbits": round(weighted_plan.mean_bits("wbits"), 4),
        "mean_abits": round(plan.mean_bits("abits"), 4),
        "param_weighted_wbits": round(weighted_mean_bits(weighted_plan, counts), 4),
    }


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.mixed and args.bit_plan:
        raise LrpqError("--mixed computes a bit plan, --bit-plan gives one: pass only one of them")
    if args.widths and not args.mixed:
        raise LrpqError("--widths bounds the widths of a mixed plan: pass it with --mixed")
    budgeted = FRACTIONAL_ALLOCATORS if args.mixed else ()
    wbits, abits = _targets(args, budgeted, f"--mixed --allocator {' or '.join(FRACTIONAL_ALLOCATORS)}")
    widths = _widths(args, wbits, abits) if args.mixed else None
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    spec = resolve_model(args.model, args.checkpoint)
    config = _quant_config(args, wbits, abits)
    out_dir = args.out or _default_run_dir(spec, wbits, abits, args.mixed)
    check_writable(out_dir, args.overwrite)
    calib = _calibration_images(args, spec)
    model = build_model(spec).to(device)
    started = time.perf_counter()
    scores = noise = None
    if args.mixed and args.allocator == SENSITIVITY_ALLOCATOR:
        noise = measure_layer_noise(model, config, calib, widths, images=min(args.noise_images, calib.shape[0]))
        config = config.with_plan(plan_from_noise(noise, wbits=wbits, abits=abits))
    elif args.mixed:
        scores = _layer_scores(args, spec, model)
        config = config.with_plan(
            plan_from_scores(model, scores, wbits=wbits, abits=abits, allocator=args.allocator, widths=widths)
        )
    quantize(model, config, calib, batch_size=args.batch_size)
    summary = {
        "model": spec.source,
        "timm_name": spec.timm_name,
        "wbits": config.wbits,
        "abits": config.abits,
        "crl": config.crl,
        "post_gelu_reparam": config.post_gelu_reparam,
        "center_keys": config.center_keys,
        "rotate_heads": config.rotate_heads,
        "rotate_hidden": config.rotate_hidden,
        "clip_k": config.clip_k,
        "gptq": config.gptq,
        "bias_correction": config.bias_correction,
        "range_metric": config.range_metric,
        "calibration_images": int(calib.shape[0]),
        "calibration_batch_size": args.batch_size,
        "seed": args.seed,
        "calibration_seconds": round(time.perf_counter() - started, 2),
        **_budget_summary(model, config),
    }
    if args.mixed:
        summary |= {"allocator": args.allocator, "target_wbits": wbits, "target_abits": abits, "widths": widths}
    if scores is not None:
        summary["relevance_images"] = scores.num_images
    if noise is not None:
        summary["noise_images"] = noise.num_images

    def write_scores(folder: Path) -> None:
        if scores is not None:
            scores.save(folder / "scores.json")
            scores.save_csv(folder / "scores.csv")
        if noise is not None:
            noise.save(folder / "noise.json")

    out = save_run(out_dir, model, spec, config, summary, overwrite=args.overwrite, extra_files=write_scores)
    print(f"quantized {spec.source} to W{wbits}A{abits} in {summary['calibration_seconds']} s → {out}")
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
    device = resolve_device(args.device)
    if is_run_dir(args.model):
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
    if args.json:
        payload |= {"model": args.model, "data": str(args.data)}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _heat_map(model: torch.nn.Module, image: torch.Tensor, method: str) -> torch.Tensor:
    """``auto``: attention rollout where the model has a class token (clearer on ViTs), else pixel LRP."""
    if method != "auto":
        return relevance_map(model, image, method=method)
    try:
        return relevance_map(model, image, method="attribution")
    except RelevanceError:
        return relevance_map(model, image, method="lrp")


def cmd_relevance(args: argparse.Namespace) -> int:
    wbits, abits = _targets(args, ("exact",), "--allocator exact")
    widths = _widths(args, wbits, abits)
    device = resolve_device(args.device)
    spec = resolve_model(args.model, args.checkpoint)
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
    out = write_relevance_report(scores, args.out, plan, heatmaps)
    print(f"scored {len(scores.scores)} layers on {scores.num_images} images of {args.data} → {out}")
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
    q.add_argument("--no-crl", action="store_true", help="skip the post-LayerNorm reparameterization")
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
        "--clip-k", type=float, help="CRL: clip channel scales to mean ± k·std before folding (default: off)"
    )
    q.add_argument("--bit-plan", help="per-layer bits JSON (e.g. bits.json of an earlier run)")
    q.add_argument("--mixed", action="store_true", help="choose per-layer bits (mean = W/A bits) by --allocator")
    q.add_argument(
        "--allocator",
        choices=(*ALLOCATORS, SENSITIVITY_ALLOCATOR),
        default="paper",
        help="from relevance: the paper rule or the exact budgeted solver; sensitivity: from each layer's "
        "measured logit noise at every width (one calibration per width)",
    )
    _add_widths_argument(q)
    q.add_argument(
        "--noise-images",
        type=_positive_int,
        default=DEFAULT_NOISE_IMAGES,
        help=f"calibration images the sensitivity allocator measures on (default {DEFAULT_NOISE_IMAGES}, "
        "at most the calibration set)",
    )
    q.add_argument(
        "--relevance-images",
        type=_positive_int,
        default=DEFAULT_RELEVANCE_IMAGES,
        help=f"images (from --calib-data) to score layers on (default {DEFAULT_RELEVANCE_IMAGES})",
    )
    q.add_argument("--scores", help="layer scores JSON from `lrpq relevance` instead of computing them")
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
    r.add_argument("--allocator", choices=ALLOCATORS, default="paper")
    _add_widths_argument(r)
    r.add_argument("--heatmaps", type=int, default=4, help="images to draw a relevance heat map for")
    r.add_argument("--map-method", choices=("auto", "attribution", "lrp"), default="auto")
    r.add_argument("--out", required=True, help="folder to write (must not exist)")
    add_device_argument(r)
    r.set_defaults(func=cmd_relevance)

    b = commands.add_parser("bench", help="calibration, relevance, inference, memory and size as ratios to float")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LrpqError as error:
        print(f"lrpq {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
