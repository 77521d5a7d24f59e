"""``lrpq prune``: its arguments and the thin call into ``lrpq.prune.pipeline``."""

from __future__ import annotations

import argparse
import time

import torch

from lrpq.cli.arguments import add_calibration_arguments, calibration_images, fraction, positive_int
from lrpq.errors import LrpqError
from lrpq.models import build_model, resolve_model
from lrpq.prune.criteria import CRITERIA, DATA_CRITERIA
from lrpq.prune.lrp_scores import DEFAULT_LRP_SCORE, LRP_SCORES
from lrpq.prune.pipeline import PruneConfig, prune
from lrpq.prune.run_dir import staged_pruned_run, write_pruned_run
from lrpq.prune.selection import RANKINGS
from lrpq.prune.unstructured import SCOPES


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
            images = calibration_images(args, spec, why)
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
    p.add_argument("--heads", type=fraction, default=0.0, help="fraction of each block's heads to remove")
    p.add_argument("--mlp", type=fraction, default=0.0, help="fraction of each block's MLP hidden channels to remove")
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
        type=positive_int,
        default=1,
        help="round each block's kept hidden channels up to a multiple of N (e.g. 32: hardware-friendly widths, "
        "small Hadamard factors for quantize's hidden rotation; default 1)",
    )
    p.add_argument(
        "--no-recovery", action="store_true", help="do not refit proj and fc2 on the calibration images after removal"
    )
    p.add_argument(
        "--unstructured",
        type=fraction,
        default=0.0,
        help="then zero this share of the block Linears' weights by magnitude (reported as sparsity)",
    )
    p.add_argument("--unstructured-scope", choices=SCOPES, default="global", help="one threshold, or one per layer")
    add_calibration_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per relevance/statistics pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and of --criterion random")
    p.add_argument("--out", required=True, help="pruned run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_prune)
