"""Draw the README relevance figures: Imagenette dev images through the ViT-S/14 reference model.

    python scripts/relevance_figure.py   # writes docs/relevance_heatmap.png and docs/relevance_gallery.png

The first has three panels for one image: the image as the model sees it, LRP relevance at the
pixels, and Chefer's relevance × gradient attention rollout (the clearer view on DINOv2-style models,
whose pixel relevance is dominated by a few high-norm background tokens). The gallery shows the
rollout over the first dev image (in file-name order, not picked) of every class, each explained for
the class the model predicts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.data import ImageNetInfo
from tqdm import tqdm

from lrpq.data import load_calibration_images, unnormalize
from lrpq.models import build_model, resolve_model
from lrpq.relevance import relevance_map
from lrpq.relevance.report import save_heatmap, save_heatmap_grid

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IMAGENET = ImageNetInfo()
DEFAULT_IMAGE = SHARED / "data/imagenette/dev/n03445777/ILSVRC2012_val_00009902.JPEG"  # golf ball


def _name(synset: str) -> str:
    """The first English name of an ImageNet synset (``n03445777`` → ``golf ball``); other labels as they are."""
    try:
        return IMAGENET.label_name_to_description(synset).split(",")[0]
    except (KeyError, ValueError):
        return synset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models/vits14_imagenette.json"))
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--out", type=Path, default=REPO / "docs/relevance_heatmap.png")
    parser.add_argument("--gallery-data", type=Path, default=SHARED / "data/imagenette/dev")
    parser.add_argument("--gallery-out", type=Path, default=REPO / "docs/relevance_gallery.png")
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

    firsts = [min(folder.iterdir()) for folder in sorted(args.gallery_data.iterdir()) if folder.is_dir()]
    images = load_calibration_images(firsts, spec.data_config)
    synsets = spec.classes or [path.parent.name for path in firsts]
    overlays = []
    for path, picture in zip(tqdm(firsts, desc="gallery"), images, strict=True):
        with torch.inference_mode():
            predicted = synsets[int(model(picture.unsqueeze(0)).argmax())]
        heat = relevance_map(model, picture, method="attribution")
        label = f"{_name(path.parent.name)} → {_name(predicted)}"
        overlays.append((unnormalize(picture, spec.data_config), heat, label))
    gallery_title = f"{Path(args.model).stem}: relevance × gradient rollout, first dev image of each class"
    save_heatmap_grid(overlays, args.gallery_out, gallery_title)
    print(f"wrote {args.gallery_out}")


if __name__ == "__main__":
    main()
