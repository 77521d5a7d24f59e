"""The recovery views: crops keep the shape and the seed fixes them; CutMix pastes one box of another view."""

from __future__ import annotations

import pytest
import torch

from lrpq.recovery import RecoveryConfig, RecoveryError
from lrpq.recovery.augment import augment, paste_boxes


def _constant_views(count: int, height: int = 12, width: int = 16) -> torch.Tensor:
    """View k is all k, so every pixel says which view it came from."""
    return torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 3, height, width).clone()


def test_views_keep_the_shape_and_are_fixed_by_the_generator() -> None:
    images = torch.randn(4, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    first = augment(images, torch.Generator().manual_seed(0), cutmix=0.5)
    again = augment(images, torch.Generator().manual_seed(0), cutmix=0.5)
    other = augment(images, torch.Generator().manual_seed(1), cutmix=0.5)
    assert first.shape == images.shape
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_without_cutmix_the_views_are_those_of_crops_and_flips_alone() -> None:
    images = torch.randn(4, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    plain = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(augment(images, torch.Generator().manual_seed(0), cutmix=0.0), plain)
    views = _constant_views(4)
    assert torch.equal(paste_boxes(views, torch.Generator().manual_seed(0), 0.0), views)


def test_cutmix_pastes_one_box_of_another_view_at_the_same_place() -> None:
    views = _constant_views(6)
    for seed in range(20):
        mixed = paste_boxes(views, torch.Generator().manual_seed(seed), 1.0)
        for index, view in enumerate(mixed):
            pasted = view[0] != index
            sources = view[0][pasted].unique()
            assert len(sources) <= 1 and index not in sources.tolist()
            assert torch.equal(view, view[:1].expand_as(view))  # every channel alike: copied at the same place
            if pasted.any():
                rows, cols = pasted.any(1).nonzero().squeeze(1), pasted.any(0).nonzero().squeeze(1)
                box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
                assert box.all() and int(pasted.sum()) == box.numel()  # one filled rectangle


def test_cutmix_must_be_a_probability() -> None:
    with pytest.raises(RecoveryError, match=r"cutmix=1\.5 must be a probability in \[0, 1\]"):
        RecoveryConfig(cutmix=1.5)
