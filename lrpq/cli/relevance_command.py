"""``lrpq relevance``: per-layer relevance scores, the plan they give and heat maps, as a report folder."""

from __future__ import annotations

import argparse

import torch

from lrpq.allocation.from_relevance import DEFAULT_RELEVANCE_IMAGES, plan_from_scores
from lrpq.allocation.solvers import ALLOCATORS as RELEVANCE_RULES
from lrpq.cli.arguments import add_widths_argument, bits, mean_targets, mixed_widths, positive_int
from lrpq.data import draw_calibration_set, load_calibration_images, unnormalize
from lrpq.devices import add_device_argument, resolve_device
from lrpq.errors import LrpqError
from lrpq.models import build_model, resolve_model
from lrpq.outputs import staged_dir
from lrpq.relevance import RelevanceError, compute_layer_scores, relevance_map
from lrpq.relevance.report import REPORT_KIND, write_report_files


def _heat_map(model: torch.nn.Module, image: torch.Tensor, method: str) -> torch.Tensor:
    """``auto``: attention rollout where the model has a class token (clearer on ViTs), else pixel LRP."""
    if method != "auto":
        return relevance_map(model, image, method=method)
    try:
        return relevance_map(model, image, method="attribution")
    except RelevanceError:
        return relevance_map(model, image, method="lrp")


def cmd_relevance(args: argparse.Namespace) -> int:
    wbits, abits = mean_targets(args)
    fractional = [value for value in (wbits, abits) if not float(value).is_integer()]
    if args.allocator == "paper" and fractional:
        raise LrpqError(
            f"{fractional[0]} bits is a mean the paper rule cannot reach (it moves whole bits); use --allocator exact"
        )
    widths = mixed_widths(args, wbits, abits)
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


def add_relevance_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``lrpq relevance`` on the ``lrpq`` subcommands."""
    r = commands.add_parser("relevance", help="per-layer relevance scores, chosen bits and heat maps")
    r.add_argument("model", help="alias, timm model name, or model card JSON")
    r.add_argument("--checkpoint", help="weights file to load instead of timm's pretrained weights")
    r.add_argument("--data", required=True, help="ImageFolder to draw images from (training images, ideally)")
    r.add_argument("--num-images", type=positive_int, default=DEFAULT_RELEVANCE_IMAGES)
    r.add_argument("--stop-tau", type=float, help="stop early once the layer ranking is this stable (Kendall τ)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--wbits", type=bits, default=4, help="mean weight bits of the plan drawn on the chart")
    r.add_argument("--abits", type=bits, help="mean activation bits of the plan (default: --wbits)")
    r.add_argument("--allocator", choices=RELEVANCE_RULES, default="paper")
    add_widths_argument(r)
    r.add_argument("--heatmaps", type=int, default=4, help="images to draw a relevance heat map for")
    r.add_argument("--map-method", choices=("auto", "attribution", "lrp"), default="auto")
    r.add_argument("--out", required=True, help="folder to write (must not exist)")
    add_device_argument(r)
    r.set_defaults(func=cmd_relevance)
