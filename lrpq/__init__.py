"""lrpq: mixed-precision post-training quantization of vision transformers (LRP-QViT on RepQ-ViT)."""

from lrpq.api import prepare, quantize
from lrpq.config import BitPlan, LayerBits, QuantConfig

__all__ = ["BitPlan", "LayerBits", "QuantConfig", "prepare", "quantize"]
