"""QuantConfig / BitPlan: JSON round trips and validation of every value a quantizer cannot honour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lrpq.config import BitPlan, ConfigError, LayerBits, QuantConfig
from lrpq.errors import LrpqError

PLAN = BitPlan(
    {
        "blocks.0.attn.qkv": LayerBits(wbits=4, abits=6),
        "blocks.3.attn.matmul1": LayerBits(wbits=8, abits=3),
        "layers.1.downsample.reduction": LayerBits(wbits=2, abits=8),
    }
)


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(),
        QuantConfig(wbits=3, abits=5, clip_k=None, percentiles=(0.99, 1.0), bit_plan=PLAN),
        QuantConfig(
            wbits=8,
            abits=8,
            ln_reparam=False,
            center_keys=False,
            rotate_heads=False,
            rotate_hidden=False,
            clip_k=0.75,
            per_channel_weights=False,
            log_softmax=False,
        ),
        QuantConfig.naive(4, 6).with_plan(PLAN),
    ],
    ids=["defaults", "plan_no_clip", "flags", "naive_with_plan"],
)
def test_quant_config_json_round_trip(config: QuantConfig, tmp_path: Path) -> None:
    text = json.dumps(config.to_json_dict())
    assert QuantConfig.from_json_dict(json.loads(text)) == config
    config.save(tmp_path / "config.json")
    loaded = QuantConfig.load(tmp_path / "config.json")
    assert loaded == config
    assert isinstance(loaded.percentiles, tuple)
    assert list(loaded.bit_plan.layers) == list(config.bit_plan.layers)  # order is kept


def test_quant_config_json_layout() -> None:
    data = json.loads(json.dumps(QuantConfig(clip_k=None, percentiles=(0.999, 1.0), bit_plan=PLAN).to_json_dict()))
    assert data["clip_k"] is None
    assert data["percentiles"] == [0.999, 1.0]
    assert data["bit_plan"]["layers"]["blocks.3.attn.matmul1"] == {"wbits": 8, "abits": 3}


def test_bit_plan_round_trip_and_plain_mapping(tmp_path: Path) -> None:
    PLAN.save(tmp_path / "bits.json")
    assert BitPlan.load(tmp_path / "bits.json") == PLAN
    # A bare {name: bits} mapping (no "layers" key) is accepted too.
    bare = {"head": {"wbits": 5, "abits": 7}}
    assert BitPlan.from_json_dict(bare) == BitPlan({"head": LayerBits(5, 7)})
    assert BitPlan().to_json_dict() == {"layers": {}}


def test_bit_plan_mean_bits() -> None:
    assert PLAN.mean_bits("wbits") == pytest.approx((4 + 8 + 2) / 3)
    assert PLAN.mean_bits("abits") == pytest.approx((6 + 3 + 8) / 3)
    assert BitPlan().mean_bits() == 0.0


def test_bits_for_uses_the_plan_then_the_defaults() -> None:
    config = QuantConfig(wbits=5, abits=7, bit_plan=PLAN)
    assert config.bits_for("blocks.0.attn.qkv") == LayerBits(4, 6)
    assert config.bits_for("head") == LayerBits(5, 7)


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.5, 4.0, True, False, "4", None])
@pytest.mark.parametrize("field", ["wbits", "abits"])
def test_invalid_bits_are_rejected(field: str, bits: object) -> None:
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**{field: bits})
    with pytest.raises(ConfigError, match=field):
        LayerBits(**{"wbits": 4, "abits": 4, field: bits})


@pytest.mark.parametrize("bits", range(2, 9))
def test_bits_2_to_8_are_accepted(bits: int) -> None:
    assert QuantConfig(wbits=bits, abits=bits).bits_for("x") == LayerBits(bits, bits)


def test_invalid_bits_in_a_plan_file_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bits.json"
    path.write_text(json.dumps({"layers": {"head": {"wbits": 9, "abits": 8}}}))
    with pytest.raises(ConfigError, match=f"{path}: layer 'head': wbits=9"):
        BitPlan.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read a bit plan from .*: No such file"),
        ("{oops", "is not a bit plan \\(Expecting property name"),
        ("[4, 4]", "is not a bit plan .*expected JSON like"),
        ('{"layers": {"head": {"bits": 4}}}', "is not a bit plan .*unexpected keyword argument 'bits'"),
    ],
)
def test_unreadable_plan_files_are_one_config_error_naming_the_file(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "bits.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        BitPlan.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("clip_k", [0, 0.0, -1.0])
def test_non_positive_clip_k_is_rejected(clip_k: float) -> None:
    with pytest.raises(ConfigError, match="clip_k"):
        QuantConfig(clip_k=clip_k)


def test_nan_clip_k_is_rejected() -> None:
    with pytest.raises(ConfigError, match="clip_k"):
        QuantConfig(clip_k=math.nan)


@pytest.mark.parametrize("percentiles", [(), (0.5,), (0.3, 1.0), (1.01,)])
def test_invalid_percentiles_are_rejected(percentiles: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="percentiles"):
        QuantConfig(percentiles=percentiles)


def test_weight_range_metric_is_one_of_the_known_and_inputs_needs_gptq() -> None:
    with pytest.raises(ConfigError, match="weight_range_metric='sqnr' is unknown; use one of: mse, inputs"):
        QuantConfig(weight_range_metric="sqnr")
    with pytest.raises(ConfigError, match=r"weight_range_metric='inputs' .* needs gptq=True"):
        QuantConfig(weight_range_metric="inputs", gptq=False)
    config = QuantConfig(weight_range_metric="inputs")
    assert QuantConfig.from_json_dict(config.to_json_dict()) == config


def test_config_errors_are_user_errors() -> None:
    assert issubclass(ConfigError, LrpqError)
