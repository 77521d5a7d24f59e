"""Light augmentation of already preprocessed images, so a few calibration images give many views.

Labels are never used (the teacher labels every view), so any view of the training distribution
will do; the views stay close to it: a horizontal flip and a crop of most of the image resized back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_AREA = 0.6  # a crop keeps at least this share of the image
ASPECT = (3 / 4, 4 / 3)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each (C, H, W) image flipped with probability ½ and cropped to a random box resized back to H × W."""
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
    return torch.stack(views)
