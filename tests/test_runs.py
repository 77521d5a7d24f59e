"""Run directories: bit-identical save/load round trip, atomic writes, and every damage refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_input
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lrpq.api import quant_layers, quantize, quantizers, set_mode
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.models import ModelSpec, build_model
from lrpq.outputs import OutputError
from lrpq.quantizers import Log2Quantizer, QuantMode
from lrpq.runs import BITS_METADATA_KEY, RunError, is_lrpq_run, is_run_dir, load_run, save_run, staged_run_dir

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


def test_staged_run_dir_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "out" / "run"
    with pytest.raises(ValueError, match="half way"), staged_run_dir(target) as staging:
        assert staging.parent == target.parent and staging != target
        (staging / "model.safetensors").write_bytes(b"partial")
        raise ValueError("half way")
    assert list(tmp_path.iterdir()) == []  # neither the staging folder nor the out/ folder made for it


def test_staged_run_dir_success_renames_the_staging_folder(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with staged_run_dir(target) as staging:
        assert staging.is_dir()  # made before the work, not at the end
        (staging / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def fake_run_dir(folder: Path) -> Path:
    """What ``is_lrpq_run`` recognises: lrpq's config.json sections beside a model.safetensors."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model": {}, "quant": {}}')
    (folder / "model.safetensors").write_bytes(b"old")
    return folder


def test_existing_output_needs_overwrite_and_must_be_a_run(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"), staged_run_dir(target):
        pytest.fail("the block must not run")
    with pytest.raises(OutputError, match="--overwrite only replaces a run directory"), staged_run_dir(target, True):
        pytest.fail("the block must not run")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]

    run = fake_run_dir(tmp_path / "old-run")
    with staged_run_dir(run, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in run.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-run", "run"]  # nothing hidden left


def test_a_hugging_face_model_folder_is_not_a_run_to_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["BertModel"]}')
    (folder / "model.safetensors").write_bytes(b"weights")
    assert is_run_dir(folder) and not is_lrpq_run(folder)
    with pytest.raises(OutputError, match="not a run directory"), staged_run_dir(folder, overwrite=True):
        pytest.fail("the block must not run")
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_an_empty_folder_is_used_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with staged_run_dir(tmp_path / "run") as staging:
        (staging / "a.txt").write_text("a")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["a.txt"]


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
    with pytest.raises(OutputError, match="already exists"):
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


State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny ViT run (W6A5, patch embedding W8A8), for tests that damage copies of it."""
    return quantized_run("vit", tmp_path_factory.mktemp("saved"))[3]


@pytest.fixture
def run_copy(saved_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def rewrite_model_file(
    run: Path, change: Callable[[dict[str, torch.Tensor]], None], keep_metadata: bool = True
) -> None:
    """Change model.safetensors' tensors in place, keeping (or dropping) its metadata."""
    path = run / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata=metadata if keep_metadata else None)


def edit_config(run: Path, change: Callable[[dict], None]) -> None:
    payload = json.loads((run / "config.json").read_text())
    change(payload)
    (run / "config.json").write_text(json.dumps(payload))


def test_save_run_records_every_quantizer_width(saved_run: Path) -> None:
    with safe_open(str(saved_run / "model.safetensors"), framework="pt") as handle:
        recorded = json.loads(handle.metadata()[BITS_METADATA_KEY])
    model, _, _ = load_run(saved_run)
    assert recorded == {name: quantizer.bits for name, quantizer in quantizers(model).items()}
    assert recorded["patch_embed.proj.weight"] == 8 and recorded["blocks.0.attn.qkv.weight"] == 6
    assert recorded["blocks.0.attn.qkv.input"] == 5


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def set_key(payload: dict, section: str, key: str, value: object) -> None:
    payload[section][key] = value


# (what is damaged, how, text the one-line error must hold)
DAMAGES: list[tuple[str, Callable[[Path], None], str]] = [
    ("zero-byte model file", lambda run: (run / "model.safetensors").write_bytes(b""), "model.safetensors is damaged"),
    ("truncated model file", lambda run: truncate(run / "model.safetensors"), "model.safetensors is damaged"),
    (
        "garbage model file",
        lambda run: (run / "model.safetensors").write_bytes(b"x" * 64),
        "model.safetensors is damaged",
    ),
    ("model file deleted", lambda run: (run / "model.safetensors").unlink(), "model.safetensors is missing"),
    ("config deleted", lambda run: (run / "config.json").unlink(), "config.json is missing"),
    ("garbage config", lambda run: (run / "config.json").write_text("{not json"), "config.json is damaged: not valid"),
    ("empty config object", lambda run: (run / "config.json").write_text("{}"), "lacks the model and quant sections"),
    ("config is a list", lambda run: (run / "config.json").write_text("[1, 2]"), "lacks the model and quant sections"),
    ("config not utf-8", lambda run: (run / "config.json").write_bytes(b"\xff\xfe\x00"), "config.json is damaged"),
    (
        "unknown quant field",
        lambda run: edit_config(run, lambda c: set_key(c, "quant", "colour", "red")),
        "config.json is damaged",
    ),
    (
        "wbits out of range",
        lambda run: edit_config(run, lambda c: set_key(c, "quant", "wbits", 12)),
        "config.json is damaged: wbits=12",
    ),
    (
        "bit plan not an object",
        lambda run: edit_config(run, lambda c: set_key(c, "quant", "bit_plan", [1])),
        "config.json is damaged",
    ),
    ("model spec missing fields", lambda run: edit_config(run, lambda c: c.update(model={})), "config.json is damaged"),
    (
        "unknown timm name",
        lambda run: edit_config(run, lambda c: set_key(c, "model", "timm_name", "no_such_model")),
        "config.json describes a model lrpq cannot build",
    ),
    (
        "kwargs timm rejects",
        lambda run: edit_config(run, lambda c: c["model"]["kwargs"].update(colour="red")),
        "config.json describes a model lrpq cannot build",
    ),
    (
        "input size the model rejects",
        lambda run: edit_config(run, lambda c: c["model"]["data_config"].update(input_size=[3, 48, 48])),
        "config.json: data_config input_size 48×48 does not match kwargs img_size 32×32",
    ),
    (
        "wider model in config",
        lambda run: edit_config(run, lambda c: c["model"]["kwargs"].update(embed_dim=64)),
        "model.safetensors: cls_token is float32 (1, 1, 48) but the model of config.json needs float32 (1, 1, 64)",
    ),
    (
        "tensor of the wrong shape",
        lambda run: rewrite_model_file(run, lambda s: s.update({"head.weight": torch.zeros(5, 47)})),
        "head.weight is float32 (5, 47) but the model of config.json needs float32 (5, 48)",
    ),
    (
        "tensor of the wrong dtype",
        lambda run: rewrite_model_file(run, lambda s: s.update({"head.bias": s["head.bias"].double()})),
        "head.bias is float64 (5,) but the model of config.json needs float32 (5,)",
    ),
    (
        "unknown tensor",
        lambda run: rewrite_model_file(run, lambda s: s.update({"extra": torch.zeros(1)})),
        "has an unknown 'extra'",
    ),
    (
        "wbits edited 6 to 4",
        lambda run: edit_config(run, lambda c: set_key(c, "quant", "wbits", 4)),
        "config.json gives quantizer blocks.0.attn.proj.weight 4 bits but",
    ),
    (
        "plan width edited",
        lambda run: edit_config(run, lambda c: c["quant"]["bit_plan"]["layers"]["patch_embed.proj"].update(abits=7)),
        "config.json gives quantizer patch_embed.proj.input 7 bits but",
    ),
    (
        "written before bits were recorded",
        lambda run: rewrite_model_file(run, lambda s: None, keep_metadata=False),
        "written by an older lrpq",
    ),
    (
        "zero point beyond its width",
        lambda run: rewrite_model_file(
            run, lambda s: s["blocks.0.mlp.fc1.input_quantizer.zero_point"].fill_(40.0)
        ),  # 5 bits: 0…31
        "blocks.0.mlp.fc1.input has zero point 40, not an integer in 0…31 for its 5 bits",
    ),
    (
        "negative zero point",
        lambda run: rewrite_model_file(run, lambda s: s["head.weight_quantizer.zero_point"].fill_(-1.0)),
        "head.weight has zero point -1",
    ),
    (
        "fractional zero point",
        lambda run: rewrite_model_file(run, lambda s: s["head.input_quantizer.zero_point"].fill_(2.5)),
        "head.input has zero point 2.5",
    ),
    (
        "scale zero",
        lambda run: rewrite_model_file(run, lambda s: s["head.input_quantizer.scale"].fill_(0.0)),
        "head.input has a scale that is not positive and finite",
    ),
    (
        "garbage packed file",
        lambda run: (run / "model.packed.safetensors").write_bytes(b"\x00" * 16),
        "model.packed.safetensors is damaged",
    ),
    (
        "packed file without lrpq metadata",
        lambda run: save_file({"a": torch.zeros(1)}, str(run / "model.packed.safetensors")),
        "model.packed.safetensors is not a packed lrpq model",
    ),
]


@pytest.mark.parametrize(("change", "message"), [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_every_damage_is_one_run_error_naming_the_file(
    run_copy: Path, change: Callable[[Path], None], message: str
) -> None:
    change(run_copy)
    with pytest.raises(RunError) as info:
        load_run(run_copy)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert "quantize the model again" in text


def test_packed_weight_widths_are_checked_against_the_config(run_copy: Path) -> None:
    """A packed file whose metadata gives a weight another width than config.json is refused."""
    path = run_copy / "model.packed.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    layout = json.loads(metadata["lrpq_packed"])
    layout["weights"]["blocks.1.mlp.fc2.weight"]["bits"] = 3
    save_file(load_file(str(path)), str(path), metadata={"lrpq_packed": json.dumps(layout)})
    with pytest.raises(RunError, match=r"gives weight blocks\.1\.mlp\.fc2\.weight 6 bits but .*packed.* with 3"):
        load_run(run_copy)


def test_a_run_without_its_packed_file_still_loads(run_copy: Path) -> None:
    (run_copy / "model.packed.safetensors").unlink()
    model, _, config = load_run(run_copy)
    assert config.wbits == 6 and all(q.mode is QuantMode.QUANT for q in quantizers(model).values())


def test_a_folder_without_run_files_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="not a run directory"):
        load_run(tmp_path)
    (tmp_path / "summary.json").write_text("{}")  # one file of a run: a damaged run, naming what is missing
    with pytest.raises(RunError, match=r"damaged run directory: config\.json is missing"):
        load_run(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_directory_follows_the_umask(tmp_path: Path, umask: int) -> None:
    spec = tiny_spec("vit")
    torch.manual_seed(0)
    model = quantize(build_model(spec), QuantConfig(wbits=8, abits=8), tiny_input("vit", 2), progress=False)
    previous = os.umask(umask)
    try:
        out = save_run(tmp_path / "run", model, spec, QuantConfig(wbits=8, abits=8), {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert {"model.safetensors", "model.packed.safetensors", "config.json"} <= modes.keys()
