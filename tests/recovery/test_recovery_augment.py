"""The recovery views: the crops and flips keep the shape, the generator fixes them, and they vary."""

from __future__ import annotations

import torch

from lrpq.recovery.augment import augment


def test_views_keep_the_shape_and_are_fixed_by_the_generator() -> None:
    images = torch.randn(4, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    first = augment(images, torch.Generator().manual_seed(0))
    again = augment(images, torch.Generator().manual_seed(0))
    other = augment(images, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_view_is_a_resized_crop_that_keeps_the_range_of_its_image() -> None:
    images = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(2)) + torch.arange(6.0).view(6, 1, 1, 1)
    views = augment(images, torch.Generator().manual_seed(0))
    for image, view in zip(images, views, strict=True):
        # bilinear resizing only interpolates: every view stays within its own image's range
        assert image.min() - 1e-6 <= view.min() and view.max() <= image.max() + 1e-6
