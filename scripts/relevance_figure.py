"""Draw the README relevance figure: one Imagenette dev image through the ViT-S/14 reference model.

    python scripts/relevance_figure.py            # writes docs/relevance_heatmap.png

Three panels: the image as the model sees it, LRP relevance at the pixels, and Chefer's
relevance × gradient attention rollout (the clearer view on DINOv2-style models, whose pixel
relevance is dominated by a few high-norm background tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrpq.data import load_calibration_images, unnormalize
from lrpq.models import build_model, resolve_model
from lrpq.relevance import relevance_map
from lrpq.relevance_export import save_heatmap

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_IMAGE = SHARED / "data/imagenette/dev/n03445777/ILSVRC2012_val_00009902.JPEG"  # golf ball


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models/vits14_imagenette.json"))
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--out", type=Path, default=REPO / "docs/relevance_heatmap.png")
    args = parser.parse_args()
    spec = resolve_model(args.model)
    model = build_model(spec)
    image = load_calibration_images([args.image], spec.data_config)[0]
    maps = {
        "LRP relevance at the pixels": relevance_map(model, image, method="lrp"),
        "Chefer attribution (relevance × gradient rollout)": relevance_map(model, image, method="attribution"),
    }
    title = f"{Path(args.model).stem}: {args.image.parent.name}/{args.image.name}"
    save_heatmap(unnormalize(image, spec.data_config), maps, args.out, title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
