"""A recovered model saved as a run directory loads back, from either file, computing exactly the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_tiny, tiny_input

from lrpq.api import convert, prepare, quantize, set_mode
from lrpq.config import QuantConfig
from lrpq.export import PACKED_FILE, load_packed_state
from lrpq.models import ModelSpec, build_model
from lrpq.quantizers import QuantMode
from lrpq.recovery import LEARNABLE, RecoveryConfig, recover
from lrpq.runs import load_run, save_run


def tiny_spec(family: str) -> ModelSpec:
    timm_name, kwargs, input_size = FAMILIES[family]
    card_kwargs = {key: list(value) if isinstance(value, tuple) else value for key, value in kwargs.items()}
    data_config = {"input_size": list(input_size), "mean": [0.5] * 3, "std": [0.25] * 3}
    return ModelSpec(source=f"tiny-{family}", timm_name=timm_name, kwargs=card_kwargs, data_config=data_config)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_recovered_run_reloads_bit_exactly_from_both_files(tmp_path: Path, family: str) -> None:
    spec, config = tiny_spec(family), QuantConfig(4, 4)
    torch.manual_seed(0)
    images = tiny_input(family, batch=8, seed=3)
    model = quantize(build_model(spec), config, images, progress=False)
    torch.manual_seed(0)
    # Rounding learned at a rate large enough to move some levels.
    recovery = RecoveryConfig(steps=6, batch_size=4, lr_rounding=0.1, learn=LEARNABLE)
    report = recover(model, build_model(spec), images, recovery, progress=False)
    assert report.changed_levels > 0  # the rounding moved: the offsets now differ from GPTQ's
    sections = {"recovery": recovery.to_json_dict()}
    out = save_run(tmp_path / "run", model, spec, config, {"recovered": True}, sections=sections)
    assert RecoveryConfig.from_json_dict(json.loads((out / "config.json").read_text())["recovery"]) == recovery

    x = tiny_input(family, batch=3, seed=7)
    with torch.inference_mode():
        expected = model(x)
    loaded, _, loaded_config = load_run(out)  # needs nothing but the run directory
    assert loaded_config == config
    packed = convert(prepare(build_tiny(family, seed=123), config))
    packed.load_state_dict(load_packed_state(out / PACKED_FILE), strict=True)
    set_mode(packed, QuantMode.QUANT)
    with torch.inference_mode():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(packed.eval()(x), expected)
