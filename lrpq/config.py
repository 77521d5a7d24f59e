"""Frozen, JSON-round-trippable configuration for a quantization run.

Every quantization point has a stable dotted name taken from the timm module tree
(``blocks.3.attn.qkv``, ``blocks.3.attn.matmul1``, ``layers.1.downsample.reduction``),
so a per-layer bit plan can be written, read back and applied to the same architecture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lrpq.errors import LrpqError

MIN_PRIMITIVE_BITS = 2
MAX_PRIMITIVE_BITS = 8
DEFAULT_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
RANGE_METRICS = ("mse", "output")
WEIGHT_RANGE_METRICS = ("mse", "inputs")
FOLDED_GRIDS = ("target", "refit")


class ConfigError(LrpqError):
    """A configuration value that no quantizer can honour."""


def check_bits(bits: int, *, what: str, low: int = MIN_PRIMITIVE_BITS, high: int = MAX_PRIMITIVE_BITS) -> int:
    """Return ``bits`` if it is an integer in [low, high], else raise a ConfigError naming ``what``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(f"{what}={bits!r} is not a supported bit width; use an integer from {low} to {high}")
    return bits


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one quantized layer: its weights (if any) and its input activations."""

    wbits: int
    abits: int

    def __post_init__(self) -> None:
        check_bits(self.wbits, what="wbits")
        check_bits(self.abits, what="abits")


@dataclass(frozen=True)
class BitPlan:
    """Ordered layer name → bit widths; the contract between allocation and quantization."""

    layers: Mapping[str, LayerBits] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {"layers": {name: asdict(bits) for name, bits in self.layers.items()}}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> BitPlan:
        layers = data.get("layers", data)
        plan = {}
        for name, bits in layers.items():
            try:
                plan[name] = LayerBits(**bits)
            except ConfigError as error:
                raise ConfigError(f"layer {name!r}: {error}") from None
        return cls(plan)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        """Read a plan file (a run's ``bits.json``), or say in one line why ``path`` is not one."""
        try:
            return cls.from_json_dict(json.loads(Path(path).read_text()))
        except OSError as error:
            raise ConfigError(f"cannot read a bit plan from {path}: {error.strerror or error}") from None
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        except (ValueError, TypeError, AttributeError) as error:
            raise ConfigError(
                f"{path} is not a bit plan ({error}); expected JSON like "
                '{"layers": {"blocks.0.attn.qkv": {"wbits": 4, "abits": 4}, ...}}, as in a run\'s bits.json'
            ) from None

    def mean_bits(self, kind: str = "wbits") -> float:
        """Unweighted mean of ``wbits`` or ``abits`` over the plan's layers (the paper's budget)."""
        values = [getattr(bits, kind) for bits in self.layers.values()]
        return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class QuantConfig:
    """Everything that determines a quantized model, given the float model and calibration images.

    ``bit_plan`` overrides ``wbits``/``abits`` for the layers it names; every other layer uses the
    defaults. ``ln_reparam`` turns on RepQ-ViT's post-LayerNorm reparameterization (the channel fold
    into the LayerNorm affine and the next Linear), ``post_gelu_reparam`` the same channel fold for
    the input of ``mlp.fc2`` (held at that layer's input, see ``lrpq.reparam``). ``clip_k`` is CRL's
    clipping width for the post-LayerNorm fold, the activations LRP-QViT defines it for: channel
    scales and zero points held within mean ± k·std (``None``: no clipping, RepQ-ViT's fold; the
    post-GELU fold is never clipped). ``folded_grid`` is the per-tensor grid of a folded activation:
    ``"target"``, the grid the (clipped) channel factors map every channel onto, as RepQ-ViT and CRL
    define it, so CRL's outlier channels are clipped by it; ``"refit"``, a percentile search on the
    folded activation, which lets those outliers widen the grid again (lrpq's earlier behaviour, kept
    for comparison).
    ``conv_abits`` is the input width of Conv2d layers — in a ViT only the patch embedding, whose
    input is the image — kept at 8 bits as in RepQ-ViT (``None``: use ``abits``); a bit plan entry
    still wins. ``center_keys`` shifts every key channel by the centre of its calibration range
    through the qkv bias, which softmax does not see (``lrpq.reparam``), so the per-tensor q·kᵀ
    operand range is not spent on channel offsets. ``rotate_heads`` rotates every attention head's
    queries and keys together, and its values (undone in ``proj``), by a Hadamard matrix: exact in
    float, and it spreads outlier channels over the head before the per-tensor q·kᵀ, attn·v and
    proj-input quantizers see them (``lrpq.reparam``). ``rotate_hidden`` rotates every fc2 input
    (the post-GELU activation) online by a Kronecker-factored Hadamard matrix before its channel fold,
    undone in fc2's weights: exact in float, and a heavy-tailed hidden vector becomes one that a
    per-tensor grid covers with less error (``lrpq.reparam``). ``gptq`` rounds every Linear's weights on their
    grid by GPTQ (``lrpq.gptq``) instead of to the nearest level (RepQ-ViT's rounding). It is on by
    default: the folds move channel factors into the sinks' weight columns, and GPTQ spends the
    rounding error where the inputs are small; it raised the logit SNR of the W4A4 and W6A6 models of
    both references (README), for about twice the calibration time on deit_s (``lrpq bench``).
    ``bias_correction`` sets every Linear and Conv2d output mean back to its float mean, layer after
    layer (``lrpq.bias_correction``; opt-in, two more passes).
    ``range_metric`` is how an activation quantizer's candidate ranges are compared: ``"mse"``, the
    squared error of the tensor (RepQ-ViT); ``"output"``, each element's squared error weighted by the
    squared gradient of a random projection of the logits, i.e. the first-order error at the output
    (``lrpq.output_weighted_ranges``; opt-in, it adds a backward pass to calibration).
    ``weight_range_metric`` is how a Linear weight's per-row range is chosen: ``"mse"``, percentile
    candidates compared by the weight's own squared error (RepQ-ViT; on a row of a few hundred values
    that is its min-max range); ``"inputs"``, the min-max range shrunk by the candidate of least output
    error ``e·XᵀX·eᵀ`` on the calibration inputs, chosen by GPTQ before it rounds (``lrpq.gptq``;
    opt-in, needs ``gptq``: at 3 bits it clips the range of most rows, docs/findings.md).
    ``per_channel_weights`` and ``log_softmax`` exist so the naive baseline is the same code path.
    """

    wbits: int = 4
    abits: int = 4
    ln_reparam: bool = True
    post_gelu_reparam: bool = True
    center_keys: bool = True
    rotate_heads: bool = True
    rotate_hidden: bool = True
    gptq: bool = True
    bias_correction: bool = False
    clip_k: float | None = None
    folded_grid: str = "target"
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    conv_abits: int | None = 8
    calibrate_on_quantized: bool = False
    range_metric: str = "mse"
    weight_range_metric: str = "mse"
    per_channel_weights: bool = True
    log_softmax: bool = True
    bit_plan: BitPlan = field(default_factory=BitPlan)

    @classmethod
    def naive(cls, wbits: int, abits: int) -> QuantConfig:
        """The floor to beat: per-tensor min-max everywhere, no reparameterization, uniform softmax."""
        return cls(
            wbits,
            abits,
            ln_reparam=False,
            post_gelu_reparam=False,
            center_keys=False,
            rotate_heads=False,
            rotate_hidden=False,
            percentiles=(1.0,),
            conv_abits=None,
            per_channel_weights=False,
            log_softmax=False,
            gptq=False,
        )

    def __post_init__(self) -> None:
        check_bits(self.wbits, what="wbits")
        check_bits(self.abits, what="abits")
        if self.conv_abits is not None:
            check_bits(self.conv_abits, what="conv_abits")
        if self.clip_k is not None and not (math.isfinite(self.clip_k) and self.clip_k > 0):
            raise ConfigError(f"clip_k={self.clip_k} must be a positive finite number (or None to disable clipping)")
        if not self.percentiles or not all(0.5 < p <= 1.0 for p in self.percentiles):
            raise ConfigError(f"percentiles={self.percentiles} must be a non-empty list of values in (0.5, 1]")
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if self.folded_grid not in FOLDED_GRIDS:
            raise ConfigError(f"folded_grid={self.folded_grid!r} is unknown; use one of: {', '.join(FOLDED_GRIDS)}")
        if self.range_metric not in RANGE_METRICS:
            raise ConfigError(f"range_metric={self.range_metric!r} is unknown; use one of: {', '.join(RANGE_METRICS)}")
        if self.weight_range_metric not in WEIGHT_RANGE_METRICS:
            raise ConfigError(
                f"weight_range_metric={self.weight_range_metric!r} is unknown; "
                f"use one of: {', '.join(WEIGHT_RANGE_METRICS)}"
            )
        if self.weight_range_metric == "inputs" and not self.gptq:
            raise ConfigError("weight_range_metric='inputs' is chosen by GPTQ's input statistics; it needs gptq=True")
        if self.range_metric == "output" and self.calibrate_on_quantized:
            raise ConfigError(
                "range_metric='output' observes float activations in a backward pass; "
                "it cannot be combined with calibrate_on_quantized=True"
            )

    def bits_for(self, name: str, *, conv: bool = False) -> LayerBits:
        """Bit widths of the layer called ``name``: from the plan if named there, else the defaults."""
        if name in self.bit_plan.layers:
            return self.bit_plan.layers[name]
        abits = self.conv_abits if conv and self.conv_abits is not None else self.abits
        return LayerBits(self.wbits, abits)

    def with_plan(self, plan: BitPlan) -> QuantConfig:
        return replace(self, bit_plan=plan)

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["percentiles"] = list(self.percentiles)
        data["bit_plan"] = self.bit_plan.to_json_dict()
        return data

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        fields = dict(data)
        if "crl" in fields:  # written before the fold and CRL's clipping had their own names
            fields["ln_reparam"] = fields.pop("crl")
            fields.setdefault("folded_grid", "refit")  # what those versions did
        fields["percentiles"] = tuple(fields.get("percentiles", DEFAULT_PERCENTILES))
        fields["bit_plan"] = BitPlan.from_json_dict(fields.get("bit_plan", {}))
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> QuantConfig:
        return cls.from_json_dict(json.loads(Path(path).read_text()))
