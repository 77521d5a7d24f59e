"""Tiny quantized students and their float teachers for the recovery tests."""

from __future__ import annotations

import torch
from conftest import build_tiny, tiny_input
from torch import nn

from lrpq.api import quantize, quantizers
from lrpq.config import QuantConfig

CALIB = 8


def student_and_teacher(family: str = "vit", bits: int = 4) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A W``bits``A``bits`` fake-quant tiny model, the same float model, and its calibration images."""
    images = tiny_input(family, batch=CALIB, seed=3)
    student = quantize(build_tiny(family), QuantConfig(bits, bits), images, progress=False)
    return student, build_tiny(family), images


def grids(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Every quantizer's width and zero point, by name."""
    return {
        name: (quantizer.bits, quantizer.zero_point.clone() if hasattr(quantizer, "zero_point") else None)
        for name, quantizer in quantizers(model).items()
    }
