"""Output-weighted range choice: an activation element's error counts by how much the logits feel it.

To first order an error ``e`` at element ``i`` of a quantization point moves the logits ``z`` by
``J_i·e``, so with uncorrelated errors the squared logit error is ``Σ_i ‖J_i‖²·e_i²`` (the Gauss–Newton
diagonal). For a random ``v ~ N(0, I)`` the gradient of ``vᵀz`` has ``E[(∂vᵀz/∂a_i)²] = ‖J_i‖²``, so
one backward pass per calibration batch gives every element an unbiased weight, and the observers pick
the range with the least weighted error (``QuantMode.OBSERVE_WEIGHTED``). Plain squared error lets the
many elements the output barely depends on outvote the few it does: in a ViT's last block only the
class token reaches the head, yet it is one token in 257.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lrpq.devices import model_device
from lrpq.errors import LrpqError

PROJECTION_SEED = 0


def output_gradient_runner(seed: int = PROJECTION_SEED) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A batch runner that follows the forward with a backward of ``vᵀ·logits`` for a seeded random ``v``.

    The gradient is taken with respect to the input batch only, so no parameter gradient is computed
    or kept; the quantizers' tensor hooks see the gradients on the way.
    """
    generator = torch.Generator().manual_seed(seed)

    def run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        images = batch.detach().to(model_device(model)).requires_grad_(True)
        with torch.enable_grad():
            logits = model(images)
            if not isinstance(logits, torch.Tensor) or not logits.requires_grad:
                raise LrpqError(
                    f"range_metric='output' needs a model that returns a logits tensor depending on its "
                    f"input; this one returned {type(logits).__name__}; use range_metric='mse'"
                )
            projection = torch.randn(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
            torch.autograd.grad(logits, images, grad_outputs=projection)
        return logits.detach()

    return run
