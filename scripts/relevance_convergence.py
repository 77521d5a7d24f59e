"""How many calibration images do LRP-QViT layer scores need? Kendall's τ vs the all-images ranking.

    python scripts/relevance_convergence.py ../shared/models/vits14_imagenette.json \
        ../shared/data/imagenette/calib --num-images 100

Scores every image once, then for each checkpoint n compares the layer ranking from the first n
images (in a seeded random order) with the ranking from all of them, both for the raw scores and
for the block-relative importance that bit allocation consumes.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
from PIL import Image

from lrpq.outputs import replace_text
from lrpq.ranking import kendall_tau
from lrpq.relevance import Contributions, collect_contributions, ranking_stability

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def load_card(path: Path) -> tuple[torch.nn.Module, dict]:
    """Float32 timm model and data config described by a shared model card."""
    card = json.loads(path.read_text())
    model = timm.create_model(card["timm_name"], pretrained=False, **card["kwargs"])
    state = safetensors.torch.load_file(path.parent / card["checkpoint"])
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return model.eval(), card["data_config"]


def image_batches(files: Sequence[Path], data_config: dict, batch_size: int) -> Iterator[torch.Tensor]:
    transform = timm.data.create_transform(
        **{key: data_config[key] for key in TRANSFORM_KEYS if key in data_config}, is_training=False
    )
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        yield torch.stack([transform(Image.open(file).convert("RGB")) for file in chunk])


def relative_stability(contributions: Contributions, checkpoints: Sequence[int]) -> list[float]:
    """τ of block-relative importance from the first n images vs from all images."""
    names = contributions.names

    def relative(n: int) -> np.ndarray:
        part = Contributions(names, contributions.block_of, contributions.values[:n]).to_scores()
        values = part.relative()
        return np.array([values[name] for name in names])

    full = relative(len(contributions.values))
    return [kendall_tau(relative(n), full) for n in checkpoints]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card", type=Path, help="model card JSON (shared/models/*.json)")
    parser.add_argument("data", type=Path, help="ImageFolder directory of calibration images")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order")
    parser.add_argument("--checkpoints", type=str, default="1,2,4,8,16,24,32,48,64,96,128,192")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)

    files = sorted(p for p in args.data.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    random.Random(args.seed).shuffle(files)
    files = files[: args.num_images]
    model, data_config = load_card(args.card)
    contributions = collect_contributions(model, image_batches(files, data_config, args.batch_size))
    total = len(contributions.values)
    checkpoints = [n for n in (int(c) for c in args.checkpoints.split(",")) if n < total] + [total]
    rows = [
        {"n": n, "tau_scores": tau, "tau_relative": tau_rel}
        for (n, tau), tau_rel in zip(
            ranking_stability(contributions.values, checkpoints),
            relative_stability(contributions, checkpoints),
            strict=True,
        )
    ]
    print(f"{args.card.name}: {total} images, {len(contributions.names)} layers")
    print("| n | τ scores | τ relative |\n|---|---|---|")
    for row in rows:
        print(f"| {row['n']} | {row['tau_scores']:.3f} | {row['tau_relative']:.3f} |")
    if args.out is not None:
        table = {"card": args.card.name, "images": total, "rows": rows}
        replace_text(args.out, json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
