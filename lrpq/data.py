"""ImageFolder data for evaluation and calibration: listing, labels, transforms and seeded draws.

Listings are sorted so every run sees images in the same order; unreadable images are skipped
and counted instead of aborting an evaluation hours in.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform
from torch.utils.data import DataLoader, Dataset

from lrpq.errors import LrpqError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
IMAGENET_CLASSES = 1000
SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_TRANSFORM_KEYS = frozenset(inspect.signature(create_transform).parameters) - {"is_training"}
# PIL reports corrupt or truncated files as OSError, a few as ValueError or SyntaxError.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Transform = Callable[[Image.Image], torch.Tensor]
Sample = tuple[Path, str]


class DataError(LrpqError):
    """A data folder, calibration list or image set that cannot be used as asked."""


def build_transform(data_config: Mapping[str, Any]) -> Transform:
    """timm's evaluation transform; only keys create_transform accepts, so model cards may carry extras."""
    mean = [float(m) for m in data_config.get("mean", ())]
    std = [float(s) for s in data_config.get("std", ())]
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise DataError(f"data_config mean={mean} std={std} would give NaN/Inf; use finite values, std > 0")
    kwargs = {key: value for key, value in data_config.items() if key in _TRANSFORM_KEYS}
    return create_transform(**kwargs, is_training=False)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str | Path) -> list[Sample]:
    """(image path, class folder name) for ``folder/<class>/**/<image>``, sorted by class then path."""
    root = Path(folder)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data folder {root} {what}; pass an ImageFolder directory <folder>/<class>/<image>")
    samples = [
        (path, class_dir.name)
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for path in sorted(class_dir.rglob("*"))
        if _is_image(path)
    ]
    if not samples:
        raise DataError(
            f"data folder {root} has no images in class sub-folders; "
            f"expected <folder>/<class>/<image> with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return samples


def class_to_index(class_names: list[str], classes: list[str] | None, num_classes: int) -> dict[str, int]:
    """Label index per class folder: the card's order, else ImageNet-1k synsets, else sorted names."""
    names = sorted(set(class_names))
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DataError(f"class folders {unknown} are not in the model's classes {classes}")
        return {n: classes.index(n) for n in names}
    synsets = ImageNetInfo().label_names()
    if num_classes == IMAGENET_CLASSES and all(n in synsets for n in names):
        return {n: synsets.index(n) for n in names}
    if len(names) > num_classes:
        raise DataError(
            f"{len(names)} class folders but the model predicts {num_classes} classes; "
            "use a folder with at most that many classes, ImageNet synset names, or a card with classes"
        )
    return {n: i for i, n in enumerate(names)}


class Unreadable(NamedTuple):
    """Returned in place of a sample whose file cannot be decoded, for the collate function to drop."""

    path: str


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; 16-bit grayscale is scaled to 8 bits, which PIL's convert would clip to 255.

    PIL reads 16-bit grayscale PNG/TIFF/PGM as ``I;16`` (and its byte orders) or as 32-bit ``I``; ``v / 257``
    maps 0…65535 onto 0…255 and gives back ``v`` for an 8-bit value widened as ``v · 257``. Every other mode
    (palette, LA/RGBA, CMYK, 1-bit, …) is PIL's own conversion.
    """
    if image.mode not in SIXTEEN_BIT_GRAY_MODES:
        return image.convert("RGB")
    values = np.clip(np.asarray(image).astype(np.int64), 0, 2**16 - 1)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8)).convert("RGB")


def _load_image(path: Path, transform: Transform) -> torch.Tensor | None:
    try:
        with Image.open(path) as image:
            return transform(to_rgb(image))
    except _UNREADABLE:
        return None


class ImageFolderDataset(Dataset):
    """Labelled images from ``list_images``; an unreadable file yields ``Unreadable`` instead of raising."""

    def __init__(self, samples: list[Sample], class_index: Mapping[str, int], transform: Transform) -> None:
        self.samples = list(samples)
        self.class_index = dict(class_index)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        path, class_name = self.samples[index]
        image = _load_image(path, self.transform)
        return Unreadable(str(path)) if image is None else (image, self.class_index[class_name])


class Batch(NamedTuple):
    """A collated batch plus the files dropped from it, so the main process can count them."""

    images: torch.Tensor
    labels: torch.Tensor
    unreadable: list[str]


def collate_skipping(items: list[tuple[torch.Tensor, int] | Unreadable]) -> Batch:
    """Stack readable samples and report the paths of unreadable ones (counted in the main process)."""
    good = [item for item in items if not isinstance(item, Unreadable)]
    bad = [item.path for item in items if isinstance(item, Unreadable)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
    return Batch(torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), bad)


class ImageLoader:
    """Iterates ``(images, labels)`` batches and records skipped files of the last pass in ``unreadable``.

    Counting happens here, not in the dataset, because dataset objects live in worker processes.
    """

    def __init__(self, loader: DataLoader, folder: Path) -> None:
        self.loader = loader
        self.folder = folder
        self.unreadable: list[str] = []

    @property
    def skipped(self) -> int:
        return len(self.unreadable)

    @property
    def num_images(self) -> int:
        return len(self.loader.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.unreadable = []
        for batch in self.loader:
            self.unreadable.extend(batch.unreadable)
            if len(batch.labels):
                yield batch.images, batch.labels
        if self.unreadable:
            warnings.warn(
                f"skipped {self.skipped} unreadable image(s) in {self.folder} (first: {self.unreadable[0]})",
                stacklevel=2,
            )


def evenly_spaced(samples: Sequence[Any], limit: int | None) -> list[Any]:
    """``limit`` items spread over the whole sorted list, so a quick subset still covers every class."""
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit < 1:
        raise DataError(f"limit={limit} must be a positive number of images (or omitted for all)")
    return [samples[i * len(samples) // limit] for i in range(limit)]


def make_loader(
    folder: str | Path,
    data_config: Mapping[str, Any],
    classes: list[str] | None,
    num_classes: int,
    batch_size: int = 64,
    limit: int | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> ImageLoader:
    """Deterministic (unshuffled) evaluation loader; ``loader.skipped`` counts unreadable images.

    ``pin_memory`` (for batches bound for a GPU) collates into page-locked memory, which copies to
    the device asynchronously.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be a positive integer")
    if workers < 0:
        raise DataError(f"workers={workers} must be 0 (load in this process) or a positive integer")
    samples = evenly_spaced(list_images(folder), limit)
    class_index = class_to_index([name for _, name in samples], classes, num_classes)
    dataset = ImageFolderDataset(samples, class_index, build_transform(data_config))
    loader = DataLoader(
        dataset, batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skipping, pin_memory=pin_memory
    )
    return ImageLoader(loader, Path(folder))


def draw_calibration_set(folder: str | Path, n: int, seed: int) -> list[Path]:
    """``n`` images drawn without replacement by a seeded permutation of the sorted listing."""
    samples = list_images(folder)
    if n < 1:
        raise DataError(f"asked for {n} calibration images; use a positive number")
    if n > len(samples):
        raise DataError(f"asked for {n} calibration images but {folder} has {len(samples)}")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    return [samples[i][0] for i in order[:n].tolist()]


def read_calibration_list(list_file: str | Path, data_root: str | Path) -> list[Path]:
    """Paths from a calibration list (one per line, relative to ``data_root``; ``#`` starts a comment)."""
    list_file, data_root = Path(list_file), Path(data_root)
    if not list_file.is_file():
        raise DataError(f"calibration list {list_file} does not exist; see calib/README.md")
    lines = [line.strip() for line in list_file.read_text().splitlines()]
    paths = [data_root / line for line in lines if line and not line.startswith("#")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"calibration list {list_file}: {len(missing)} file(s) not under {data_root} "
            f"(first: {missing[0]}); pass the folder the list was drawn from"
        )
    if not paths:
        raise DataError(f"calibration list {list_file} names no images; put one relative path per line")
    return paths


def load_calibration_images(paths: Sequence[str | Path], data_config: Mapping[str, Any]) -> torch.Tensor:
    """Preprocessed calibration batch (N, C, H, W); unreadable files are skipped with one warning."""
    if not paths:
        raise DataError("no calibration images given; pass at least one image path")
    transform = build_transform(data_config)
    loaded = [(Path(p), _load_image(Path(p), transform)) for p in paths]
    images = [image for _, image in loaded if image is not None]
    bad = [str(path) for path, image in loaded if image is None]
    if not images:
        raise DataError(f"none of the {len(paths)} calibration images could be read (first: {bad[0]})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable calibration image(s) (first: {bad[0]})", stacklevel=2)
    return torch.stack(images)


def unnormalize(image: torch.Tensor, data_config: Mapping[str, Any]) -> torch.Tensor:
    """A preprocessed (C, H, W) image as the model saw it, back in [0, 1] for display."""
    mean = image.new_tensor(data_config["mean"]).view(-1, 1, 1)
    std = image.new_tensor(data_config["std"]).view(-1, 1, 1)
    return (image * std + mean).clamp(0, 1)
