"""What a bit plan costs, counted three ways, and the budget a mixed plan must stay within.

* ``layers``: the unweighted mean width over the planned layers (LRP-QViT's budget). An fc1 with
  four times the parameters of a proj counts the same, so a plan can meet it while being bigger.
* ``size``: weight bits weighted by parameter count, i.e. the model's weight storage.
* ``bops``: bit-operations, Σ MACs · weight bits · input bits (a matmul's two operands both take the
  layer's input width), i.e. the compute of an integer kernel; a plan under this budget is also held
  to the fixed model's size (weights are allocated by size first, then inputs by BOPs given them).

A mixed plan's budget is what the fixed-bit plan at the target widths costs on the same layers, so
"mixed beats fixed" is always a comparison at equal (or lower) cost.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lrpq.api import prepare, quant_layers
from lrpq.config import BitPlan, QuantConfig
from lrpq.modules import QuantMatMul
from lrpq.runs import effective_plan

BUDGETS = ("layers", "size", "bops")


@dataclass(frozen=True)
class LayerCost:
    """A quantized layer's weight count (0 for a matmul) and its multiply-accumulates per image."""

    params: int
    macs: int

    def bops(self, wbits: int, abits: int, *, weightless: bool) -> int:
        """Bit-operations per image: MACs × the widths of the two operands each product reads."""
        return self.macs * abits * (abits if weightless else wbits)


def layer_costs(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, LayerCost]:
    """Every quantized layer's ``LayerCost``, counted on one forward of a prepared copy of ``model``.

    ``model`` may be float or already quantized; the copy is prepared with quantizers OFF, so only
    shapes matter. Linear MACs are ``tokens × in × out``, Conv2d's ``outputs × in/groups × kh × kw``,
    a matmul's ``batch × n × k × m``.
    """
    prepared = model if quant_layers(model) else prepare(copy.deepcopy(model), QuantConfig())
    macs: dict[str, int] = {}

    def count(name: str, layer: nn.Module):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(layer, QuantMatMul):
                a, b = args
                macs[name] = a.numel() * b.shape[-1]  # (…, n, k) @ (…, k, m): n·k·m per batch element
            elif isinstance(layer, nn.Conv2d):
                per_output = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
                macs[name] = output.numel() * per_output
            else:
                macs[name] = output.numel() * layer.in_features

        return hook

    layers = quant_layers(prepared)
    handles = [layer.register_forward_hook(count(name, layer)) for name, layer in layers.items()]
    try:
        parameter = next(prepared.parameters())
        with torch.no_grad():
            prepared(torch.zeros(1, *input_size, dtype=parameter.dtype, device=parameter.device))
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: LayerCost(0 if isinstance(layer, QuantMatMul) else layer.weight.numel(), macs.get(name, 0))
        for name, layer in layers.items()
    }


@dataclass(frozen=True)
class PlanCost:
    """A plan's cost in the three budget units, over the layers it was counted on."""

    mean_wbits: float  # over layers with weights
    mean_abits: float  # over every layer
    weight_bits: float  # Σ params · wbits: the weight storage in bits
    param_weighted_wbits: float  # weight_bits / Σ params
    bops: float  # Σ MACs · wbits · abits per image

    def to_json_dict(self, reference: PlanCost | None = None) -> dict[str, float]:
        """The numbers, and with ``reference`` (the fixed plan) the size and BOPs as ratios to it."""
        data = {
            "mean_wbits": round(self.mean_wbits, 4),
            "mean_abits": round(self.mean_abits, 4),
            "param_weighted_wbits": round(self.param_weighted_wbits, 4),
            "weight_megabytes": round(self.weight_bits / 8e6, 4),
            "gbops": round(self.bops / 1e9, 4),
        }
        if reference is not None:
            data |= {
                "size_vs_fixed": round(self.weight_bits / reference.weight_bits, 4),
                "bops_vs_fixed": round(self.bops / reference.bops, 4),
            }
        return data


def _cost(costs: Mapping[str, LayerCost], widths: Mapping[str, tuple[float, float]]) -> PlanCost:
    weighted = [name for name, cost in costs.items() if cost.params > 0]
    params = sum(costs[name].params for name in weighted)
    weight_bits = sum(costs[name].params * widths[name][0] for name in weighted)
    bops = sum(
        cost.macs * widths[name][1] * (widths[name][1] if cost.params == 0 else widths[name][0])
        for name, cost in costs.items()
    )
    return PlanCost(
        mean_wbits=sum(widths[name][0] for name in weighted) / max(1, len(weighted)),
        mean_abits=sum(widths[name][1] for name in costs) / max(1, len(costs)),
        weight_bits=weight_bits,
        param_weighted_wbits=weight_bits / params if params else 0.0,
        bops=bops,
    )


def plan_cost(plan: BitPlan, costs: Mapping[str, LayerCost]) -> PlanCost:
    """Cost of the layers of ``costs`` at the widths ``plan`` gives them (every one must be in the plan)."""
    return _cost(costs, {name: (plan.layers[name].wbits, plan.layers[name].abits) for name in costs})


def target_cost(
    costs: Mapping[str, LayerCost], targets: tuple[float, float], pinned: Mapping[str, int] | None = None
) -> PlanCost:
    """What the fixed-bit plan at mean widths ``targets`` costs (a fractional mean counted as it is):
    the budget a mixed plan is held to. ``pinned`` inputs keep their width."""
    pinned = pinned or {}
    return _cost(costs, {name: (targets[0], pinned.get(name, targets[1])) for name in costs})


def quantized_model_cost(
    model: nn.Module, config: QuantConfig, targets: tuple[float, float], image_size: tuple[int, int, int]
) -> dict[str, float]:
    """A quantized model's cost all three ways over every quantized layer, with its size and BOPs as ratios
    to the fixed-bit plan at mean widths ``targets`` (the patch embedding's input at ``conv_abits`` in both)."""
    costs = layer_costs(model, image_size)
    layers = quant_layers(model)
    pinned = {name: config.conv_abits for name in costs if isinstance(layers[name], nn.Conv2d)}
    pinned = {name: bits for name, bits in pinned.items() if bits is not None}
    return plan_cost(effective_plan(model, config), costs).to_json_dict(target_cost(costs, targets, pinned))
