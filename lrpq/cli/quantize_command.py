"""``lrpq quantize``: its arguments, and the run directory it writes around ``lrpq.api.quantize``."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from lrpq.allocation.budget import BUDGETS, quantized_model_cost
from lrpq.allocation.from_relevance import DEFAULT_RELEVANCE_IMAGES
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
from lrpq.api import quantize
from lrpq.cli.arguments import (
    add_calibration_arguments,
    add_widths_argument,
    bits,
    calibration_images,
    image_folder,
    mean_targets,
    mixed_widths,
    positive_float,
    positive_int,
)
from lrpq.config import FOLDED_GRIDS, RANGE_METRICS, WEIGHT_RANGE_METRICS, BitPlan, QuantConfig
from lrpq.data import draw_calibration_set, load_calibration_images
from lrpq.devices import add_device_argument, resolve_device
from lrpq.errors import LrpqError
from lrpq.models import ModelSpec, build_model, resolve_model
from lrpq.prune.cost import model_cost
from lrpq.recovery import DEFAULT_LOSS as DEFAULT_RECOVERY_LOSS
from lrpq.recovery import LEARNABLE, RECOVERY_WEIGHT_RANGE, RecoveryConfig, RecoveryReport, recover
from lrpq.relevance import LayerScores
from lrpq.runs import staged_run_dir, write_run


def _relevance_images(args: argparse.Namespace, spec: ModelSpec) -> torch.Tensor:
    """--relevance-images images of the calibration folder (drawn with --seed), for the relevance allocators."""
    paths = draw_calibration_set(image_folder(args, "the relevance allocator"), args.relevance_images, args.seed)
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
        weight_range_metric=_weight_range(args),
        clip_k=None if args.no_crl else args.clip_k,
        folded_grid=args.folded_grid,
    )
    if args.bit_plan:
        config = config.with_plan(BitPlan.load(args.bit_plan))
    return config


def _weight_range(args: argparse.Namespace) -> str:
    """--weight-range, by default the input-weighted ranges for a run that --recover trains with GPTQ's rounding
    (never worse after recovery on either reference), the library's default otherwise."""
    if args.weight_range is not None:
        return args.weight_range
    return RECOVERY_WEIGHT_RANGE if args.recover is not None and not args.no_gptq else QuantConfig.weight_range_metric


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
        if args.recover_learn is not None:
            raise LrpqError("--recover-learn sets what --recover trains: pass it with --recover")
        return None
    steps = {} if args.recover_steps is None else {"steps": args.recover_steps}
    drop = {} if args.recover_drop is None else {"drop": args.recover_drop}
    learn = {} if args.recover_learn is None else {"learn": tuple(args.recover_learn)}
    return RecoveryConfig(loss=args.recover, seed=args.seed, **steps, **drop, **learn)


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
    wbits, abits = mean_targets(args)
    recovery = _recovery_config(args)
    budget = args.budget or default_budget(args.allocator)
    if args.mixed:
        check_request(args.allocator, budget, wbits, abits)
    widths = mixed_widths(args, wbits, abits) if args.mixed else None
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
        calib = calibration_images(args, spec, "quantization")
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
            "weight_range_metric": config.weight_range_metric,
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


def add_quantize_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``lrpq quantize`` on the ``lrpq`` subcommands."""
    q = commands.add_parser("quantize", help="quantize a model and write a run directory")
    q.add_argument("model", help="alias (deit_s, swin_t, …), timm model name, or model card JSON")
    q.add_argument("--checkpoint", help="weights file to load instead of timm's pretrained weights")
    q.add_argument(
        "--wbits",
        type=bits,
        required=True,
        help="weight bits (3–8); with --mixed the mean, which the exact and sensitivity allocators also "
        "take fractional (3.5)",
    )
    q.add_argument("--abits", type=bits, help="activation bits (3–8, as --wbits; default: --wbits)")
    add_calibration_arguments(q)
    q.add_argument(
        "--batch-size",
        type=positive_int,
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
        "--weight-range",
        choices=WEIGHT_RANGE_METRICS,
        help="choose each weight row's range by its own squared error (mse) or by the output error on the "
        "calibration inputs (inputs: shrinks the range where that helps, chosen by GPTQ; best at 3 bits and "
        f"after recovery). Default: {RECOVERY_WEIGHT_RANGE} with --recover (and GPTQ), "
        f"{QuantConfig.weight_range_metric} otherwise",
    )
    q.add_argument(
        "--clip-k",
        type=positive_float,
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
    add_widths_argument(q)
    q.add_argument(
        "--min-wbits",
        type=int,
        metavar="N",
        help="narrowest weight width a plan may give (not the paper rule, which moves one bit around the "
        f"target); at most the target (default: {DEFAULT_MIN_WBITS or 'the lowest of --widths'})",
    )
    q.add_argument(
        "--noise-images",
        type=positive_int,
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
        type=positive_int,
        default=DEFAULT_RELEVANCE_IMAGES,
        help=f"images (from --calib-data) to score layers on (default {DEFAULT_RELEVANCE_IMAGES})",
    )
    q.add_argument("--scores", help="layer scores JSON from `lrpq relevance` instead of computing them")
    q.add_argument(
        "--recover",
        nargs="?",
        const=DEFAULT_RECOVERY_LOSS,
        metavar="LOSS[+LOSS…]",
        help="after calibration, train activation scales, LayerNorm and biases against the float model on the "
        f"calibration images with this distillation loss (e.g. kd:0.5+mse; default {DEFAULT_RECOVERY_LOSS})",
    )
    q.add_argument(
        "--recover-steps",
        type=positive_int,
        help=f"optimisation steps of --recover (default {RecoveryConfig.steps})",
    )
    q.add_argument(
        "--recover-drop",
        type=float,
        metavar="P",
        help="QDrop while --recover trains: each activation value stays float with probability P, in [0, 1) "
        f"(default {RecoveryConfig.drop}; 0.5 helps at 3 bits, docs/recovery.md)",
    )
    q.add_argument(
        "--recover-learn",
        nargs="+",
        choices=LEARNABLE,
        metavar="PART",
        help=f"what --recover trains, some of {', '.join(LEARNABLE)} (default {' '.join(RecoveryConfig.learn)}; "
        "rounding moves weights between levels and costs about a quarter more time)",
    )
    q.add_argument("--out", help="run directory to write (default runs/<model>-w<W>a<A>)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    add_device_argument(q)
    q.set_defaults(func=cmd_quantize)
