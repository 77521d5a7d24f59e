"""Model resolution (aliases, timm names, cards) and strict checkpoint loading."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_model_data_config

from lrpq.errors import LrpqError
from lrpq.models import ALIASES, ModelError, ModelSpec, build_model, resolve_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference models not found at {SHARED}")

TINY_KWARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 4}
TINY_DATA = {"input_size": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def write_card(folder: Path, **overrides: object) -> Path:
    card = {"timm_name": "vit_tiny_patch16_224", "kwargs": TINY_KWARGS, "data_config": TINY_DATA, **overrides}
    path = folder / "tiny.json"
    path.write_text(json.dumps(card))
    return path


def tiny_state(num_classes: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY_KWARGS, "num_classes": num_classes})
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_resolves_to_pretrained_timm_model(alias: str) -> None:
    spec = resolve_model(alias)
    assert spec.timm_name == ALIASES[alias]
    assert spec.source == alias
    assert spec.pretrained is True
    assert spec.checkpoint is None
    assert spec.data_config["input_size"] == (3, 224, 224)


def test_data_config_comes_from_the_model_not_the_name() -> None:
    spec = resolve_model("deit_tiny_patch16_224")
    model = build_model(dataclasses.replace(spec, pretrained=False))
    expected = resolve_model_data_config(model)
    assert spec.data_config["input_size"] == (3, 224, 224)
    assert spec.data_config == {**expected, "mean": spec.data_config["mean"], "std": spec.data_config["std"]}
    assert spec.data_config["mean"] == pytest.approx(expected["mean"])
    assert spec.data_config["std"] == pytest.approx(expected["std"])
    assert spec.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert spec.data_config["crop_pct"] == pytest.approx(0.9)
    # Same family prefix, different pretrained statistics: the config must follow the model.
    assert resolve_model("vit_b").data_config["mean"] == pytest.approx((0.5, 0.5, 0.5))
    assert not model.training


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="deit_smal") as info:
        resolve_model("deit_smal")
    message = str(info.value)
    assert "deit_s," in message
    assert "deit_small_patch16_224" in message
    assert "\n" not in message
    assert isinstance(info.value, LrpqError)


def test_missing_card_and_bad_json_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.json does not exist"):
        resolve_model(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        resolve_model(str(broken))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"timm_name": "vit_tinny_patch16_224"}, "vit_tiny_patch16_224"),
        ({"kwargs": [1, 2]}, "kwargs must be"),
        ({"data_config": {"input_size": [3, 16, 16]}}, "at least input_size, mean, std"),
        ({"data_config": {**TINY_DATA, "std": [0.0, 1.0, 1.0]}}, "std > 0"),
        ({"data_config": {**TINY_DATA, "mean": [0.5, 0.5]}}, "do not agree"),
        ({"classes": "cat"}, "classes must be a list"),
        ({"checkpoint": 3}, "checkpoint must be a file name"),
        ({"checkpoint": "absent.safetensors"}, "absent.safetensors does not exist"),
    ],
)
def test_invalid_card_fields_are_named(tmp_path: Path, overrides: dict, match: str) -> None:
    with pytest.raises(ModelError, match=re.escape(match)):
        resolve_model(str(write_card(tmp_path, **overrides)))


@pytest.mark.parametrize(
    ("kwargs", "input_size", "message"),
    [
        (TINY_KWARGS, [3, 24, 24], "input_size 24×24 does not match kwargs img_size 16×16"),
        ({**TINY_KWARGS, "img_size": [16, 32]}, [3, 16, 16], "input_size 16×16 does not match kwargs img_size 16×32"),
        (
            {key: value for key, value in TINY_KWARGS.items() if key != "img_size"},
            [3, 16, 16],
            "input_size 16×16 does not match vit_tiny_patch16_224's default input size 224×224",
        ),
        ({**TINY_KWARGS, "img_size": "big"}, [3, 16, 16], "img_size='big' must be an integer or [H, W]"),
    ],
)
def test_card_input_size_must_match_the_model(tmp_path: Path, kwargs: dict, input_size: list, message: str) -> None:
    card = write_card(tmp_path, kwargs=kwargs, data_config={**TINY_DATA, "input_size": input_size})
    with pytest.raises(ModelError, match=re.escape(message)) as info:
        resolve_model(str(card))
    assert str(info.value).startswith(f"model card {card}") and "\n" not in str(info.value)


def test_card_input_size_agreeing_with_the_model_in_either_form(tmp_path: Path) -> None:
    rectangular = {**TINY_KWARGS, "img_size": [16, 32]}
    card = write_card(tmp_path, kwargs=rectangular, data_config={**TINY_DATA, "input_size": [3, 16, 32]})
    assert resolve_model(str(card)).data_config["input_size"] == (3, 16, 32)
    dynamic = {**TINY_KWARGS, "dynamic_img_size": True}  # takes any size
    card = write_card(tmp_path, kwargs=dynamic, data_config={**TINY_DATA, "input_size": [3, 24, 24]})
    assert resolve_model(str(card)).data_config["input_size"] == (3, 24, 24)
    convnet = write_card(tmp_path, timm_name="test_resnet", kwargs={"num_classes": 4})  # no fixed input size
    assert resolve_model(str(convnet)).data_config["input_size"] == (3, 16, 16)


def test_card_checkpoint_is_relative_to_the_card_and_cast_to_float32(tmp_path: Path) -> None:
    state = tiny_state()
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    spec = resolve_model(str(write_card(tmp_path, checkpoint="w.safetensors", classes=list("abcd"))))
    assert spec.checkpoint == str((tmp_path / "w.safetensors").resolve())
    assert spec.pretrained is False
    assert spec.classes == ["a", "b", "c", "d"]
    assert spec.data_config["interpolation"] == "bicubic"  # filled in from the architecture's defaults
    model = build_model(spec)
    loaded = model.state_dict()["head.weight"]
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, state["head.weight"].half().float())


def test_nested_torch_checkpoint_loads(tmp_path: Path) -> None:
    state = tiny_state()
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "w.pth")
    model = build_model(resolve_model(str(write_card(tmp_path)), checkpoint=str(tmp_path / "w.pth")))
    key = "blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(model.state_dict()[key], state[key])


def test_checkpoint_with_wrong_shapes_names_the_keys(tmp_path: Path) -> None:
    save_file(tiny_state(num_classes=7), str(tmp_path / "other.safetensors"))
    spec = resolve_model(str(write_card(tmp_path)), checkpoint=str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match=r"other\.safetensors does not fit") as info:
        build_model(spec)
    assert "head.weight (7, 16) vs (4, 16)" in str(info.value)
    assert "\n" not in str(info.value)


def test_checkpoint_with_missing_keys_is_summarised(tmp_path: Path) -> None:
    state = tiny_state()
    del state["norm.weight"], state["cls_token"]
    state["extra.bias"] = torch.zeros(2)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"missing: cls_token, norm\.weight; unexpected: extra\.bias"):
        build_model(resolve_model(str(write_card(tmp_path)), checkpoint=str(tmp_path / "w.pt")))


def test_unreadable_or_absent_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    spec = resolve_model(str(write_card(tmp_path)), checkpoint=str(tmp_path / "junk.safetensors"))
    with pytest.raises(ModelError, match=r"junk\.safetensors could not be read"):
        build_model(spec)
    with pytest.raises(ModelError, match=r"missing\.pth does not exist"):
        resolve_model("deit_t", checkpoint=str(tmp_path / "missing.pth"))


def test_offline_pretrained_download_suggests_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("cannot reach the hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match=r"deit_tiny_patch16_224 .*--checkpoint PATH"):
        build_model(resolve_model("deit_t"))


def test_model_spec_json_round_trip(tmp_path: Path) -> None:
    spec = resolve_model(str(write_card(tmp_path, classes=["x", "y"])))
    data = json.loads(json.dumps(spec.to_json_dict()))
    assert data["data_config"]["input_size"] == [3, 16, 16]
    assert ModelSpec.from_json_dict(data) == spec
    with pytest.raises(ModelError, match="malformed"):
        ModelSpec.from_json_dict({**data, "colour": "red"})


@needs_shared
def test_shared_cards_resolve() -> None:
    ref_a = resolve_model(str(SHARED / "models" / "vit_cifar10.json"))
    assert ref_a.timm_name == "vit_tiny_patch16_224"
    assert ref_a.kwargs["patch_size"] == 4
    assert ref_a.checkpoint == str(SHARED.resolve() / "models" / "vit_cifar10.safetensors")
    assert ref_a.data_config["input_size"] == (3, 32, 32)
    assert ref_a.data_config["std"] == pytest.approx((0.247, 0.2435, 0.2616))
    assert ref_a.classes is not None and ref_a.classes[0] == "airplane" and len(ref_a.classes) == 10
    ref_b = resolve_model(str(SHARED / "models" / "vits14_imagenette.json"))
    assert ref_b.timm_name == "vit_small_patch14_dinov2"
    assert ref_b.data_config["input_size"] == (3, 224, 224)  # the card overrides the 518 px default
    assert ref_b.classes is not None and ref_b.classes[0] == "n01440764"


@needs_shared
def test_shared_ref_a_builds_with_the_file_weights() -> None:
    spec = resolve_model(str(SHARED / "models" / "vit_cifar10.json"))
    model = build_model(spec)
    expected = load_file(spec.checkpoint)
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value.float(), rtol=0, atol=0)
    assert not model.training
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@needs_shared
def test_a_shared_card_with_another_input_size_is_refused(tmp_path: Path) -> None:
    card = json.loads((SHARED / "models" / "vit_cifar10.json").read_text())
    card["data_config"]["input_size"] = [3, 64, 64]
    card["checkpoint"] = str(SHARED / "models" / card["checkpoint"])
    path = tmp_path / "vit_cifar10_64.json"
    path.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="input_size 64×64 does not match kwargs img_size 32×32"):
        resolve_model(str(path))
