"""Light augmentation of already preprocessed images, so a few calibration images give many views.

Labels are never used (the teacher labels every view), so any view of the training distribution
will do; the views stay close to it: a horizontal flip and a crop of most of the image resized back.
``cutmix`` widens them further without leaving the pixel statistics of natural images: the teacher
and the student see the same composite, so matching them on it is still matching the float function
("function matching", Beyer et al., CVPR 2022), on more distinct inputs than 32 images give.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_AREA = 0.6  # a crop keeps at least this share of the image
ASPECT = (3 / 4, 4 / 3)


def augment(images: torch.Tensor, generator: torch.Generator, cutmix: float = 0.0) -> torch.Tensor:
    """Each (C, H, W) image flipped with probability ½ and cropped to a random box resized back to H × W;
    then, with probability ``cutmix``, a random box of another view of the batch pasted into it."""
    height, width = images.shape[-2:]
    views = []
    for image in images:
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        area = (MIN_AREA + (1 - MIN_AREA) * torch.rand((), generator=generator).item()) * height * width
        low, high = math.log(ASPECT[0]), math.log(ASPECT[1])
        aspect = math.exp(low + (high - low) * torch.rand((), generator=generator).item())
        crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
        crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
        top = int(torch.randint(height - crop_h + 1, (), generator=generator))
        left = int(torch.randint(width - crop_w + 1, (), generator=generator))
        crop = image[:, top : top + crop_h, left : left + crop_w].unsqueeze(0)
        views.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False).squeeze(0))
    stacked = torch.stack(views)
    return paste_boxes(stacked, generator, cutmix) if cutmix > 0 and len(stacked) > 1 else stacked


def paste_boxes(views: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """CutMix without labels: each view, with ``probability``, gets a box of a uniformly random share of its
    area (sides in the image's proportions) copied from the same place in another view of the batch."""
    height, width = views.shape[-2:]
    mixed = views.clone()
    for index in range(len(views)):
        if torch.rand((), generator=generator) >= probability:
            continue
        other = (index + 1 + int(torch.randint(len(views) - 1, (), generator=generator))) % len(views)
        side = math.sqrt(torch.rand((), generator=generator).item())
        box_h, box_w = round(side * height), round(side * width)
        top = int(torch.randint(height - box_h + 1, (), generator=generator))
        left = int(torch.randint(width - box_w + 1, (), generator=generator))
        box = (slice(None), slice(top, top + box_h), slice(left, left + box_w))
        mixed[index][box] = views[other][box]
    return mixed
