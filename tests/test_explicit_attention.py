"""explicit_attention: every flag off inside, each module's own value back afterwards, even after an error."""

from __future__ import annotations

import pytest
from torch import nn

from lrpq.explicit_attention import explicit_attention


def _flagged(value: bool) -> nn.Module:
    module = nn.Identity()
    module.fused_attn = value
    return module


def test_flags_are_off_inside_and_each_restored_to_its_own_value() -> None:
    fused, explicit, unflagged = _flagged(True), _flagged(False), nn.Identity()
    with explicit_attention([fused, explicit, unflagged]):
        assert fused.fused_attn is False and explicit.fused_attn is False
        assert not hasattr(unflagged, "fused_attn")
    assert fused.fused_attn is True and explicit.fused_attn is False
    assert not hasattr(unflagged, "fused_attn")


def test_flags_are_restored_after_an_exception() -> None:
    fused = _flagged(True)
    with pytest.raises(ZeroDivisionError), explicit_attention([fused]):
        _ = 1 / 0
    assert fused.fused_attn is True
