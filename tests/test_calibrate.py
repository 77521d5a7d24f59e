"""Input and output observation for the reparameterization pass: what is recorded, hooks gone on exit.

The quantizer calibration context is tested with the quantizers (``test_quantizers.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpq.calibrate import channel_observers, observe_inputs, observe_outputs
from lrpq.observers import ChannelRange


def test_observe_channels_and_outputs_record_then_remove_their_hooks() -> None:
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2, 3))
        linear.bias.zero_()
    ranges = {"fc": ChannelRange("fc output")}
    x = torch.tensor([[1.0, -4.0, 9.0], [3.0, 2.0, 9.0]])
    observers = channel_observers({"fc": linear}, {"fc": 8}, (1.0,))
    with observe_inputs({"fc": linear}, observers), observe_outputs({"fc": linear}, ranges):
        linear(x)
    assert not linear._forward_pre_hooks and not linear._forward_hooks
    assert ranges["fc"].midpoint().tolist() == [2.0, -1.0]  # outputs are the first two input channels
    scale, zero_point = observers["fc"].qparams()
    assert zero_point.tolist() == [0.0, 170.0, 0.0]  # -(-4) / (6 / 255) = 170
    assert scale.tolist() == pytest.approx([3.0 / 255, 6.0 / 255, 9.0 / 255])  # ranges widened to contain 0
    linear(x)  # no hook left: nothing more is recorded
    assert ranges["fc"].midpoint().tolist() == [2.0, -1.0]


def test_hooks_are_removed_when_the_block_raises() -> None:
    linear = nn.Linear(2, 2)
    with pytest.raises(RuntimeError), observe_outputs({"fc": linear}, {"fc": ChannelRange("fc")}):
        raise RuntimeError("stop")
    assert not linear._forward_hooks
