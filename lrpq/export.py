"""Packed export: quantized weights stored as real low-bit integers, so a W4 file is ~1/8 of the float one.

``save_packed(model, path)`` writes one safetensors file. Every weight whose quantizer is in QUANT
mode is replaced by the integer codes its quantizer dequantizes (``q = clamp(round(w / s) + z, 0, 2^b - 1)``
moved by GPTQ's rounding offsets) packed as a dense bitstream; its scale and zero point stay in the
state dict as they are (float32), and its rounding offsets are left out. Every other tensor (biases,
norms, embeddings, activation quantizer parameters, weights that are not quantized) is stored
unchanged. ``load_packed_state(path)`` returns a full state dict for ``model.load_state_dict``.

Bit-exactness: a packed weight comes back as ``(q - z) · s``, which is exactly the fake-quantized
original, with zero rounding offsets. Fake-quantizing it again divides by ``s`` and lands within an ulp
of the integer ``q - z``, which rounds back to itself, so the rebuilt model computes the same tensors
as the saved one. The float weights are not in the file: a model loaded from it is the quantized one
with its quantizers off too.

Layout: code ``i`` of a ``b``-bit tensor occupies bits ``[i·b, (i+1)·b)`` of the stream, most
significant bit first, and stream bit ``j`` is bit ``7 - j % 8`` of byte ``j // 8``. For 4 bits this is
two codes per byte (first code in the high nibble), for 8 bits one code per byte; 3, 5, 6 and 7 bits
use exactly ``b`` bits per weight instead of a 4- or 8-bit container, which would waste 12–37 % of
the file, at the cost of an unpacking step that only runs at load time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lrpq.errors import LrpqError
from lrpq.modules import QuantConv2d, QuantLinear
from lrpq.quantizers import QuantMode

PACKED_FILE = "model.packed.safetensors"
_METADATA_KEY = "lrpq_packed"
_FORMAT_VERSION = 1


class ExportError(LrpqError):
    """A file that is not a packed lrpq state dict, or one that does not describe its tensors."""


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] (any shape) as a uint8 bitstream of ``ceil(numel · bits / 8)`` bytes."""
    flat = codes.reshape(-1).to(torch.uint8).cpu().numpy()
    code_bits = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits :]  # (n, bits), most significant first
    return torch.from_numpy(np.packbits(code_bits.reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``count`` codes of the stream, as uint8."""
    code_bits = np.unpackbits(packed.cpu().numpy(), count=count * bits).reshape(count, bits)
    padded = np.pad(code_bits, ((0, 0), (8 - bits, 0)))
    return torch.from_numpy(np.packbits(padded, axis=1).reshape(-1))


def _packable_weights(model: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """State-dict key of every weight whose forward uses its frozen quantization grid."""
    return {
        f"{name}.weight" if name else "weight": module
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear | QuantConv2d) and module.weight_quantizer.mode is QuantMode.QUANT
    }


def save_packed(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state dict to ``path`` with its quantized weights packed to their bit width."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    packed: dict[str, dict[str, object]] = {}
    for key, layer in _packable_weights(model).items():
        quantizer = layer.weight_quantizer
        prefix = key.removesuffix("weight")
        state[key] = pack_codes(quantizer.codes(layer.weight.detach()), quantizer.bits)
        del state[f"{prefix}weight_quantizer.rounding_offset"]  # the packed codes already hold the rounding
        packed[key] = {
            "bits": quantizer.bits,
            "shape": list(layer.weight.shape),
            "dtype": str(layer.weight.dtype).removeprefix("torch."),
            "scale": f"{prefix}weight_quantizer.scale",
            "zero_point": f"{prefix}weight_quantizer.zero_point",
            "rounding_offset": f"{prefix}weight_quantizer.rounding_offset",
        }
    metadata = {_METADATA_KEY: json.dumps({"version": _FORMAT_VERSION, "weights": packed})}
    path = Path(path)
    save_file(state, str(path), metadata=metadata)
    return path


def _packed_layout(path: str | Path) -> dict[str, dict[str, Any]]:
    """The packed weights a file describes in its metadata (key → bits, shape, dtype, parameter keys)."""
    with safe_open(str(path), framework="pt") as handle:
        description = (handle.metadata() or {}).get(_METADATA_KEY)
    if description is None:
        raise ExportError(f"{path} is not a packed lrpq model (no '{_METADATA_KEY}' metadata)")
    try:
        layout = json.loads(description)
        version, weights = layout.get("version"), layout["weights"]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        raise ExportError(f"{path}: its '{_METADATA_KEY}' metadata is damaged") from None
    if version != _FORMAT_VERSION:
        raise ExportError(f"{path} has packed format version {version}; this lrpq reads {_FORMAT_VERSION}")
    if not isinstance(weights, dict) or not all(isinstance(info, dict) for info in weights.values()):
        raise ExportError(f"{path}: its '{_METADATA_KEY}' metadata is damaged")
    return weights


def packed_weight_bits(path: str | Path) -> dict[str, int]:
    """Bit width of every packed weight in ``path``, by state-dict key, read from the metadata alone."""
    return {key: info.get("bits") for key, info in _packed_layout(path).items()}


def load_packed_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict saved by ``save_packed`` on ``device``, every packed weight dequantized to ``(q - z) · s``."""
    layout = _packed_layout(path)
    state = load_file(str(path), device=str(device))
    for key, info in layout.items():
        try:
            stream, scale, zero_point = state[key], state[info["scale"]], state[info["zero_point"]]
        except KeyError as missing:
            raise ExportError(f"{path}: packed weight {key} refers to missing tensor {missing}") from None
        shape = torch.Size(info["shape"])
        codes = unpack_codes(stream, info["bits"], shape.numel()).view(shape).to(scale.device)
        state[key] = ((codes.to(scale.dtype) - zero_point) * scale).to(getattr(torch, info["dtype"]))
        # the weight is its own nearest level
        state[info["rounding_offset"]] = torch.zeros(shape, dtype=torch.int8, device=scale.device)
    return state
