"""Quantized layers built from timm modules, each owning its named quantization points.

Attention is written out as ``q·kᵀ → softmax → ·v`` so that both matmuls are real modules
(``<attn>.matmul1``, ``<attn>.matmul2``) with their own quantizers; the timm submodules (qkv, proj,
norms, dropouts, relative position bias) are reused, not copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.swin_transformer import WindowAttention
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from lrpq.config import LayerBits, QuantConfig
from lrpq.quantizers import LogSqrt2Quantizer, QuantMode, UniformQuantizer, WeightQuantizer
from lrpq.reparam import InputReparam, ensure_bias


def _layer_quantizers(
    name: str, bits: LayerBits, config: QuantConfig, weight: torch.Tensor
) -> tuple[UniformQuantizer, WeightQuantizer]:
    """Per-tensor input quantizer and (by default) per-output-channel weight quantizer of a layer."""
    input_quantizer = UniformQuantizer(
        f"{name}.input", bits.abits, config.percentiles, device=weight.device, dtype=weight.dtype
    )
    weight_quantizer = WeightQuantizer(
        f"{name}.weight", bits.wbits, config.percentiles, weight, per_channel=config.per_channel_weights
    )
    return input_quantizer, weight_quantizer


def _identity(t: torch.Tensor) -> tuple[int, int, int]:
    """What changes when a tensor is replaced, re-pointed (``.data =``, ``.to()``) or modified in place."""
    return id(t), t.data_ptr(), t._version


class _WeightCache:
    """The fake-quantized weight of a layer, recomputed only when the weight or its quantizer changes.

    A frozen weight gives the same fake-quantized tensor on every forward, so inference quantizes
    each weight once instead of once per batch (at batch 1 that is most of the work). The cache is a
    plain attribute, never in the state dict, and serves only ``torch.inference_mode``: evaluation
    runs there, the cached tensor can never reach an autograd graph, and calibration (``no_grad``)
    does not hold a second copy of every weight at its memory peak. Weights that are themselves
    inference tensors carry no version counter, and fake tensors (``torch.compile``'s tracing) no data
    pointer, so neither is ever cached: a compiled graph quantizes its weights itself.
    """

    def __init__(self) -> None:
        self._sources: tuple[torch.Tensor, ...] = ()  # kept alive so their ids stay unique
        self._key: tuple[object, ...] | None = None
        self._value: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, quantizer: WeightQuantizer) -> torch.Tensor:
        if quantizer.mode is not QuantMode.QUANT or not torch.is_inference_mode_enabled():
            return quantizer(weight)
        sources = (weight, quantizer.scale, quantizer.zero_point, quantizer.rounding_offset)
        if torch.compiler.is_compiling() or any(t.is_inference() or isinstance(t, FakeTensor) for t in sources):
            return quantizer(weight)
        key = (quantizer.bits, *(_identity(t) for t in sources))
        if key != self._key:
            self._value = quantizer(weight)
            self._sources, self._key = sources, key
        return self._value


class QuantLinear(nn.Linear):
    """Linear with a per-tensor input quantizer and a per-output-channel weight quantizer.

    A sink of an activation region also owns an ``InputReparam`` applied before its input quantizer.
    ``input_owned`` marks a sink whose input nothing else reads (a LayerNorm region's, or an
    activation region's): at inference its input is quantized in place (see ``FakeQuantizer.forward``),
    or, with an ``InputReparam``, overwritten by the rotated, mapped and quantized values, so a hook
    that keeps that LayerNorm's or activation's output sees those.
    """

    def __init__(self, linear: nn.Linear, name: str, bits: LayerBits, config: QuantConfig):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer, self.weight_quantizer = _layer_quantizers(name, bits, config, self.weight)
        self.input_reparam: InputReparam | None = None
        self.input_owned = False
        self._weight_cache = _WeightCache()

    def add_input_reparam(self, *, rotate: bool = False) -> InputReparam:
        """Give this layer an identity ``InputReparam`` (and a bias) for a channel fold (and rotation) to fill in."""
        ensure_bias(self)
        self.input_reparam = InputReparam(
            self.in_features, rotate=rotate, device=self.weight.device, dtype=self.weight.dtype
        )
        return self.input_reparam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_reparam is None:
            x = self.input_quantizer(x, overwrite=self.input_owned)
        elif self.input_quantizer.mode is QuantMode.QUANT:
            x = self._quantized_reparam_input(x)
        else:  # a fresh tensor of this layer's: quantize it in place
            x = self.input_quantizer(self.input_reparam(x), overwrite=True)
        return F.linear(x, self._weight_cache.get(self.weight, self.weight_quantizer), self.bias)

    def _quantized_reparam_input(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate, map ``/ r - b`` and fake-quantize the input on one buffer: the owned input's, if it may be.

        The rotation writes into ``x`` when this layer owns it (its intermediate is a buffer of its
        own), and the fold's per-channel map is folded into the quantizer's first pass
        (``fake_quant_uniform``'s ``affine``): at deit_s's fc2 (batch 32) two fresh 39 MB buffers and
        one pass fewer than rotating, mapping and quantizing one after the other.
        """
        reparam = self.input_reparam
        in_place = self.input_owned and not x.requires_grad and x.is_contiguous()
        rotated = reparam.rotate(x, out=x if in_place else None)
        writable = (in_place or rotated is not x) and not rotated.requires_grad
        affine = (reparam.r.reciprocal(), -reparam.b)
        return self.input_quantizer.fake_quant(rotated, out=rotated if writable else None, affine=affine)


class QuantConv2d(nn.Conv2d):
    """Conv2d with a per-tensor input quantizer and a per-output-channel weight quantizer."""

    def __init__(self, conv: nn.Conv2d, name: str, bits: LayerBits, config: QuantConfig):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.input_quantizer, self.weight_quantizer = _layer_quantizers(name, bits, config, self.weight)
        self._weight_cache = _WeightCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight_cache.get(self.weight, self.weight_quantizer)
        return self._conv_forward(self.input_quantizer(x), weight, self.bias)


class QuantMatMul(nn.Module):
    """``a @ b`` with both operands fake-quantized; ``log_a`` selects the log√2 grid for softmax outputs."""

    def __init__(
        self, name: str, abits: int, percentiles: tuple[float, ...], log_a: bool = False, **factory: object
    ) -> None:
        """``factory``: ``device`` and ``dtype`` of the operands (the attention's weights), for the buffers."""
        super().__init__()
        if log_a:
            self.a_quantizer = LogSqrt2Quantizer(f"{name}.a", abits, percentiles, **factory)
        else:
            self.a_quantizer = UniformQuantizer(f"{name}.a", abits, percentiles, **factory)
        self.b_quantizer = UniformQuantizer(f"{name}.b", abits, percentiles, **factory)

    def forward(self, a: torch.Tensor, b: torch.Tensor, *, a_owned: bool = False) -> torch.Tensor:
        """``a_owned``: ``a`` is the caller's own intermediate, which may be quantized in place."""
        return self.a_quantizer(a, overwrite=a_owned) @ self.b_quantizer(b)


def _attention_matmuls(name: str, config: QuantConfig, qkv: nn.Linear) -> tuple[QuantMatMul, QuantMatMul]:
    """q·kᵀ and attn·v of an attention whose ``qkv`` sets the device and dtype of their quantizers."""
    factory = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
    return (
        QuantMatMul(f"{name}.matmul1", config.bits_for(f"{name}.matmul1").abits, config.percentiles, **factory),
        QuantMatMul(
            f"{name}.matmul2",
            config.bits_for(f"{name}.matmul2").abits,
            config.percentiles,
            log_a=config.log_softmax,
            **factory,
        ),
    )


_ATTENTION_PIECE = 1 << 22  # attention scores per piece of ``QuantAttention._attention_by_images`` (16 MiB)


class QuantAttention(nn.Module):
    """timm ``Attention`` (ViT, DeiT, DINOv2) with explicit, quantized q·kᵀ and attn·v."""

    def __init__(self, attn: Attention, name: str, config: QuantConfig) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = attn.attn_dim
        self.scale = attn.scale
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.matmul1, self.matmul2 = _attention_matmuls(name, config, attn.qkv)
        self.attn_drop, self.norm, self.gate = attn.attn_drop, attn.norm, attn.gate
        self.proj, self.proj_drop = attn.proj, attn.proj_drop

    @property
    def key_channels(self) -> slice | None:
        """The qkv output channels that are keys, if a shift there reaches q·kᵀ unchanged (no k norm)."""
        return slice(self.attn_dim, 2 * self.attn_dim) if isinstance(self.k_norm, nn.Identity) else None

    @property
    def query_key_rotatable(self) -> bool:
        """Whether rotating every head's q and k leaves q·kᵀ unchanged (no per-channel q/k norm between)."""
        return isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)

    @property
    def values_rotatable(self) -> bool:
        """Whether proj can undo a rotation of the values (no per-channel norm or gate after attn·v)."""
        return isinstance(self.norm, nn.Identity) and self.gate is None

    def _splits_by_images_exactly(self, q: torch.Tensor) -> bool:
        """Whether ``_attention_by_images`` gives exactly what the whole-batch products give.

        It does when every quantizer of both matmuls applies frozen parameters element by element
        (none is observing), no autograd graph is recorded, dropout draws nothing (evaluation), and
        no hook expects to see the whole attention pass through the matmuls or the dropout.
        """
        quantizers = (
            self.matmul1.a_quantizer,
            self.matmul1.b_quantizer,
            self.matmul2.a_quantizer,
            self.matmul2.b_quantizer,
        )
        hooked = (self.matmul1, self.matmul2, self.attn_drop, *quantizers)
        return (
            not self.attn_drop.training
            and not (q.requires_grad and torch.is_grad_enabled())
            and all(quantizer.mode in (QuantMode.QUANT, QuantMode.OFF) for quantizer in quantizers)
            and not any(module._forward_hooks or module._forward_pre_hooks for module in hooked)
        )

    def _attention_by_images(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q·kᵀ)·v`` quantized as ``forward`` does, a few images' attention maps at a time.

        Scores and probabilities are the largest activations of a ViT, and past glibc's 32 MiB
        ``mmap`` threshold every fresh buffer is mapped page by page on first touch: ref-B's 257
        tokens make a 51 MB map per batch of 32. Maps of at most ``_ATTENTION_PIECE`` elements are
        reused from the heap instead, and softmax and the log quantizer then work in place on them:
        the unquantized products of ref-B's attention (batch 32) took 70 ms whole against 35 ms by
        pieces. Operands are quantized whole, before the split; each product, row softmax and
        element's quantization is the same as the whole batch's, so the result is bitwise equal.
        """
        a1, b1 = self.matmul1.a_quantizer(q * self.scale, overwrite=True), self.matmul1.b_quantizer(k.transpose(-2, -1))
        values = self.matmul2.b_quantizer(v)
        out = values.new_empty(q.shape[:-1] + values.shape[-1:])
        scores_per_image = q.shape[1] * q.shape[2] * k.shape[2]  # heads · queries · keys
        images = max(1, _ATTENTION_PIECE // scores_per_image)
        for start in range(0, len(q), images):
            piece = slice(start, start + images)
            scores = torch.matmul(a1[piece], b1[piece])
            attn = self.attn_drop(torch.softmax(scores, dim=-1, out=scores))
            torch.matmul(self.matmul2.a_quantizer(attn, overwrite=True), values[piece], out=out[piece])
        return out

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if attn_mask is None and not is_causal and self._splits_by_images_exactly(q):
            x = self._attention_by_images(q, k, v)
        else:
            scores = self.matmul1(q * self.scale, k.transpose(-2, -1), a_owned=True)
            scores = maybe_add_mask(scores, resolve_self_attn_mask(tokens, scores, attn_mask, is_causal))
            attn = self.attn_drop(scores.softmax(dim=-1))
            x = self.matmul2(attn, v, a_owned=True)
        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(nn.Module):
    """Swin ``WindowAttention`` with relative position bias and shift mask, quantized matmuls explicit."""

    def __init__(self, attn: WindowAttention, name: str, config: QuantConfig) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = attn.qkv
        self.matmul1, self.matmul2 = _attention_matmuls(name, config, attn.qkv)
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop

    @property
    def key_channels(self) -> slice:
        """The qkv output channels that are keys (qkv emits q, k, v in thirds)."""
        dim = self.qkv.out_features // 3
        return slice(dim, 2 * dim)

    # q·kᵀ is all that reaches the scores (the position bias and mask are added per score), and proj
    # reads attn·v directly: both rotations of ``lrpq.reparam.rotate_heads`` are exact here.
    query_key_rotatable = True
    values_rotatable = True

    def _relative_position_bias(self) -> torch.Tensor:
        """(1, heads, window_area, window_area) bias gathered from the shared timm table."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        windows, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = self.matmul1(q * self.scale, k.transpose(-2, -1), a_owned=True)
        scores = scores + self._relative_position_bias()
        if mask is not None:
            num_win = mask.shape[0]
            scores = scores.view(-1, num_win, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, self.num_heads, tokens, tokens)
        attn = self.attn_drop(scores.softmax(dim=-1))
        x = self.matmul2(attn, v, a_owned=True).transpose(1, 2).reshape(windows, tokens, -1)
        return self.proj_drop(self.proj(x))


AttentionFactory = Callable[[nn.Module, str, QuantConfig], nn.Module]

_ATTENTION_FACTORIES: dict[type[nn.Module], AttentionFactory] = {
    Attention: QuantAttention,
    WindowAttention: QuantWindowAttention,
}


def register_attention(cls: type[nn.Module], factory: AttentionFactory) -> None:
    """Teach lrpq to quantize another attention class (e.g. mmdet's Swin ``WindowMSA``).

    ``factory(module, name, config)`` returns a replacement whose two products are ``QuantMatMul``
    children called ``matmul1`` (q·kᵀ) and ``matmul2`` (attn·v); a ``qkv`` Linear and a
    ``key_channels`` slice (or None) let the key shift of ``QuantConfig.center_keys`` reach it;
    ``num_heads``, ``proj`` and true ``query_key_rotatable``/``values_rotatable`` flags let the head
    rotation of ``QuantConfig.rotate_heads`` reach it (absent flags count as false).
    """
    _ATTENTION_FACTORIES[cls] = factory


def attention_factory(module: nn.Module) -> AttentionFactory | None:
    """The factory for this exact class (subclasses may change the forward, so no isinstance match)."""
    return _ATTENTION_FACTORIES.get(type(module))


def quantized_linear_like(module: nn.Module, name: str, config: QuantConfig) -> QuantLinear | QuantConv2d | None:
    """The quantized counterpart of a plain Linear or Conv2d, or None for anything else."""
    if type(module) is nn.Linear:
        return QuantLinear(module, name, config.bits_for(name), config)
    if type(module) is nn.Conv2d:
        return QuantConv2d(module, name, config.bits_for(name, conv=True), config)
    return None
