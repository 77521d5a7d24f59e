"""Tiny timm models of every family relevance supports, and their random images."""

from __future__ import annotations

import timm
import torch

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=5)
CONFIGS = {
    "vit": ("vit_tiny_patch16_224", TINY_VIT),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY_VIT),
    "dinov2_layerscale": ("vit_small_patch14_dinov2", {**TINY_VIT, "img_size": 28, "patch_size": 14}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 2), num_classes=5),
    ),
}
VIT_LAYERS = ("attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2")


def tiny_model(kind: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    name, kwargs = CONFIGS[kind]
    return timm.create_model(name, pretrained=False, **{**kwargs, **overrides}).eval()


def tiny_images(kind: str, count: int = 3) -> torch.Tensor:
    size = CONFIGS[kind][1]["img_size"]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def per_image_sums(t: torch.Tensor) -> torch.Tensor:
    """Each image's total relevance: what a conserving rule keeps."""
    return t.reshape(t.shape[0], -1).sum(1)
