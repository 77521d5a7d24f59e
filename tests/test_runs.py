"""Run directories: bit-identical save/load round trip and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_input
from safetensors.torch import load_file, save_file

from lrpq.api import quant_layers, quantize, quantizers, set_mode
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.models import ModelSpec, build_model
from lrpq.quantizers import Log2Quantizer, QuantMode
from lrpq.runs import RunError, atomic_dir, is_run_dir, load_run, save_run

DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def tiny_spec(family: str) -> ModelSpec:
    """A spec as a model card would give it (JSON lists, not tuples, in kwargs)."""
    timm_name, kwargs, input_size = FAMILIES[family]
    card_kwargs = {key: list(value) if isinstance(value, tuple) else value for key, value in kwargs.items()}
    data_config = {**DATA_CONFIG, "input_size": list(input_size)}
    return ModelSpec(source=f"tiny-{family}", timm_name=timm_name, kwargs=card_kwargs, data_config=data_config)


def test_tiny_spec_fields() -> None:
    spec = tiny_spec("vit")
    assert (spec.checkpoint, spec.pretrained, spec.classes) == (None, False, None)
    assert spec.data_config["input_size"] == (3, 32, 32)  # normalised to tuples
    assert ModelSpec.from_json_dict(json.loads(json.dumps(spec.to_json_dict()))) == spec


def quantized_run(family: str, folder: Path) -> tuple[torch.nn.Module, ModelSpec, QuantConfig, Path]:
    spec = tiny_spec(family)
    torch.manual_seed(0)
    config = QuantConfig(wbits=6, abits=5, bit_plan=BitPlan({"patch_embed.proj": LayerBits(8, 8)}))
    model = quantize(build_model(spec), config, tiny_input(family, batch=4), progress=False)
    summary = {"model": spec.source, "wbits": 6, "note": {"nested": "skipped in summary.txt"}}
    out = save_run(folder / "run", model, spec, config, summary)
    torch.manual_seed(123)  # a model rebuilt from the run starts from different random weights
    return model, spec, config, out


def test_save_run_writes_a_complete_run_directory(tmp_path: Path) -> None:
    model, spec, config, out = quantized_run("vit", tmp_path)
    assert out == tmp_path / "run"
    assert is_run_dir(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "bits.json",
        "config.json",
        "model.packed.safetensors",
        "model.safetensors",
        "summary.json",
        "summary.txt",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left beside it
    payload = json.loads((out / "config.json").read_text())
    assert ModelSpec.from_json_dict(payload["model"]) == spec
    assert QuantConfig.from_json_dict(payload["quant"]) == config

    bits = json.loads((out / "bits.json").read_text())["layers"]
    assert set(bits) == set(quant_layers(model))
    assert bits["patch_embed.proj"] == {"wbits": 8, "abits": 8}
    assert all(value == {"wbits": 6, "abits": 5} for name, value in bits.items() if name != "patch_embed.proj")
    assert json.loads((out / "summary.json").read_text()) == {
        "model": "tiny-vit",
        "wbits": 6,
        "note": {"nested": "skipped in summary.txt"},
        "packed_bytes": (out / "model.packed.safetensors").stat().st_size,  # added by save_run
    }
    text = (out / "summary.txt").read_text()
    assert "nested" not in text
    assert any(line.split() == ["patch_embed.proj", "8", "8"] for line in text.splitlines())


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_load_run_restores_every_tensor(family: str, tmp_path: Path) -> None:
    model, spec, config, out = quantized_run(family, tmp_path)
    loaded, loaded_spec, loaded_config = load_run(out)
    assert (loaded_spec, loaded_config) == (spec, config)
    assert not loaded.training
    assert any(isinstance(q, Log2Quantizer) for q in quantizers(loaded).values())
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[key], loaded_state[key]) for key in saved_state)
    set_mode(loaded, QuantMode.QUANT)
    x = tiny_input(family, batch=3, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_save_and_load_give_bit_identical_outputs(family: str, tmp_path: Path) -> None:
    model, _, _, out = quantized_run(family, tmp_path)
    loaded, _, _ = load_run(out)
    x = tiny_input(family, batch=3, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(q.mode is QuantMode.QUANT for q in quantizers(loaded).values())


def test_atomic_dir_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "out" / "run"
    with pytest.raises(ValueError, match="half way"), atomic_dir(target) as staging:
        assert staging.parent == target.parent and staging != target
        (staging / "model.safetensors").write_bytes(b"partial")
        raise ValueError("half way")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_dir_success_renames_the_staging_folder(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RunError, match="already exists"), atomic_dir(target):
        pytest.fail("the block must not run")
    assert (target / "old.txt").read_text() == "old"

    with atomic_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_save_run_failure_and_existing_folder(tmp_path: Path) -> None:
    spec = tiny_spec("vit")
    torch.manual_seed(0)
    model = quantize(build_model(spec), QuantConfig(wbits=8, abits=8), tiny_input("vit", 2), progress=False)

    def broken_extra(_staging: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_run(tmp_path / "run", model, spec, QuantConfig(), {}, extra_files=broken_extra)
    assert list(tmp_path.iterdir()) == []

    save_run(tmp_path / "run", model, spec, QuantConfig(), {})
    with pytest.raises(RunError, match="already exists"):
        save_run(tmp_path / "run", model, spec, QuantConfig(), {})
    save_run(tmp_path / "run", model, spec, QuantConfig(), {"again": 1}, overwrite=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == {"again": 1, "packed_bytes": summary["packed_bytes"]}


def test_load_run_names_a_model_file_from_another_lrpq(tmp_path: Path) -> None:
    _, _, _, out = quantized_run("vit", tmp_path)
    state = load_file(str(out / "model.safetensors"))
    older = {key: value for key, value in state.items() if not key.endswith("rounding_offset")}  # before GPTQ offsets
    save_file(older, str(out / "model.safetensors"))
    with pytest.raises(RunError, match=r"model.safetensors lacks '.*rounding_offset'.*quantize the model again"):
        load_run(out)


def test_load_run_rejects_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RunError, match="not a run directory"):
        load_run(tmp_path)
