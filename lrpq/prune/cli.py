"""``lrpq prune``: its arguments and the thin call into ``lrpq.prune.pipeline`` (kept out of ``lrpq.cli``)."""

from __future__ import annotations

import argparse
import os
import time

import torch

from lrpq.data import draw_calibration_set, load_calibration_images, read_calibration_list
from lrpq.errors import LrpqError
from lrpq.models import ModelSpec, build_model, resolve_model
from lrpq.prune.criteria import CRITERIA, DATA_CRITERIA
from lrpq.prune.lrp_scores import DEFAULT_LRP_SCORE, LRP_SCORES
from lrpq.prune.pipeline import PruneConfig, prune
from lrpq.prune.run_dir import staged_pruned_run, write_pruned_run
from lrpq.prune.selection import RANKINGS
from lrpq.prune.unstructured import SCOPES


def _fraction(text: str) -> float:
    """A share of units or weights to remove: 0 ≤ f < 1 (every block keeps at least one unit)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _calibration_images(args: argparse.Namespace, spec: ModelSpec, why: str) -> torch.Tensor:
    """Seeded draw from --calib-data (or $LRPQ_CALIB_DATA), or a fixed --calib-list relative to it."""
    folder = args.calib_data or os.environ.get("LRPQ_CALIB_DATA")
    if folder is None:
        raise LrpqError(f"{why} needs calibration images: pass --calib-data DIR (an ImageFolder)")
    if args.calib_list:
        paths = read_calibration_list(args.calib_list, folder)
    else:
        paths = draw_calibration_set(folder, args.calib_size, args.seed)
    return load_calibration_images(paths, spec.data_config)


def cmd_prune(args: argparse.Namespace) -> int:
    config = PruneConfig(
        heads=args.heads,
        mlp=args.mlp,
        criterion=args.criterion,
        ranking=args.ranking,
        hidden_multiple=args.hidden_multiple,
        recovery=not args.no_recovery,
        lrp_score=args.lrp_score,
        unstructured=args.unstructured,
        unstructured_scope=args.unstructured_scope,
        seed=args.seed,
    )
    if not config.structured and not config.unstructured:
        raise LrpqError("nothing to prune: pass --heads, --mlp (fractions in [0, 1)) or --unstructured SPARSITY")
    torch.manual_seed(args.seed)
    spec = resolve_model(args.model, args.checkpoint)
    with staged_pruned_run(args.out, args.overwrite) as staging:  # an unusable --out fails before any work
        images = None
        if config.needs_images:
            why = (
                f"criterion {config.criterion!r}"
                if config.criterion in DATA_CRITERIA
                else "recovery (--no-recovery skips it)"
            )
            images = _calibration_images(args, spec, why)
        model = build_model(spec)
        started = time.perf_counter()
        result = prune(model, config, images, input_size=spec.data_config["input_size"], batch_size=args.batch_size)
        seconds = round(time.perf_counter() - started, 2)
        summary = write_pruned_run(staging, result, spec)
    out = args.out
    heads = sum(k["heads"] for k in summary["kept"].values())
    hidden = sum(k["hidden"] for k in summary["kept"].values())
    sparsity = f", block weights {result.sparsity.sparsity:.1%} zero" if result.sparsity else ""
    print(
        f"pruned {spec.source} by {config.criterion} in {seconds} s: {heads} heads and {hidden} hidden channels kept, "
        f"params {result.before.params / 1e6:.2f} M → {result.after.params / 1e6:.2f} M, "
        f"FLOPs {result.before.flops / 1e9:.3f} G → {result.after.flops / 1e9:.3f} G{sparsity} → {out}"
    )
    return 0


def add_prune_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``lrpq prune`` on the ``lrpq`` subcommands."""
    p = commands.add_parser("prune", help="remove attention heads and MLP hidden channels; write a loadable card")
    p.add_argument("model", help="alias, timm model name, model card JSON, or a pruned run directory")
    p.add_argument("--checkpoint", help="weights file to load instead of timm's pretrained weights")
    p.add_argument("--heads", type=_fraction, default=0.0, help="fraction of each block's heads to remove")
    p.add_argument("--mlp", type=_fraction, default=0.0, help="fraction of each block's MLP hidden channels to remove")
    p.add_argument("--criterion", choices=CRITERIA, default="lrp", help="how units are scored (default lrp)")
    p.add_argument(
        "--lrp-score",
        choices=LRP_SCORES,
        default=DEFAULT_LRP_SCORE,
        help=f"lrp: a unit's relevance, or its relevance × gradient (default {DEFAULT_LRP_SCORE})",
    )
    p.add_argument(
        "--ranking",
        choices=RANKINGS,
        default="per-block",
        help="per-block: every block keeps ⌈(1−f)·units⌉; global: one budget over all blocks, scores relative "
        "to their block's mean (default per-block)",
    )
    p.add_argument(
        "--hidden-multiple",
        type=_positive_int,
        default=1,
        help="round each block's kept hidden channels up to a multiple of N (e.g. 32: hardware-friendly widths, "
        "small Hadamard factors for quantize's hidden rotation; default 1)",
    )
    p.add_argument(
        "--no-recovery", action="store_true", help="do not refit proj and fc2 on the calibration images after removal"
    )
    p.add_argument(
        "--unstructured",
        type=_fraction,
        default=0.0,
        help="then zero this share of the block Linears' weights by magnitude (reported as sparsity)",
    )
    p.add_argument("--unstructured-scope", choices=SCOPES, default="global", help="one threshold, or one per layer")
    p.add_argument("--calib-data", help="ImageFolder to draw calibration images from (or $LRPQ_CALIB_DATA)")
    p.add_argument("--calib-list", help="fixed list of calibration images, relative to --calib-data")
    p.add_argument("--calib-size", type=_positive_int, default=32, help="calibration images to draw (default 32)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per relevance/statistics pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and of --criterion random")
    p.add_argument("--out", required=True, help="pruned run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_prune)
