"""The whole prune step, and pruned models everywhere else: saved cards, relevance, quantization, quantized runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import FAMILIES, build_tiny, tiny_input
from safetensors.torch import load_file

from lrpq.api import quantize
from lrpq.config import QuantConfig
from lrpq.models import ModelError, ModelSpec, build_model, resolve_model
from lrpq.prune.pipeline import PruneConfig, PruneError, prune
from lrpq.prune.run_dir import save_pruned_run
from lrpq.prune.structure import PrunedStructure, apply_structure, prunable_blocks
from lrpq.relevance import explain
from lrpq.runs import load_run, save_run

DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}


def spec_for(family: str) -> ModelSpec:
    timm_name, kwargs, shape = FAMILIES[family]
    return ModelSpec("tiny", timm_name, kwargs, data_config={**DATA_CONFIG, "input_size": list(shape)})


def pruned_tiny(family: str, criterion: str = "l1", **overrides: object) -> tuple[torch.nn.Module, object]:
    config = PruneConfig(**{"heads": 0.5, "mlp": 0.5, "criterion": criterion, **overrides})
    model = build_tiny(family)
    images = tiny_input(family, batch=6, seed=2)
    return model, prune(model, config, images, input_size=FAMILIES[family][2], progress=False)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_pruning_nothing_with_recovery_is_the_identity(family: str) -> None:
    model = build_tiny(family)
    original = copy.deepcopy(model)
    result = prune(model, PruneConfig(criterion="lrp"), tiny_input(family), input_size=FAMILIES[family][2])
    x = tiny_input(family, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    assert result.after == result.before
    assert result.structure.is_identity() and result.refits == [] and result.scores is None


@pytest.mark.parametrize("criterion", ["lrp", "l1", "slimming", "thinet", "regression", "random"])
def test_every_criterion_prunes_and_recovers(criterion: str) -> None:
    _, result = pruned_tiny("vit", criterion)
    assert result.after.params < result.before.params and result.after.flops < result.before.flops
    assert [block.attn.num_heads for block in prunable_blocks(result.model).values()] == [1, 1]
    assert [block.mlp.fc1.out_features for block in prunable_blocks(result.model).values()] == [96, 96]
    assert all(refit.after <= refit.before for refit in result.refits) and len(result.refits) == 4
    summary = result.summary()
    assert (summary["heads_removed"], summary["hidden_removed"], summary["calibration_images"]) == (0.5, 0.5, 6)
    json.dumps(summary)  # all of it is JSON


def test_recovery_and_data_criteria_need_images() -> None:
    with pytest.raises(PruneError, match="--no-recovery"):
        prune(build_tiny("vit"), PruneConfig(mlp=0.5, criterion="l1"), input_size=(3, 32, 32))
    with pytest.raises(PruneError, match="lrp"):
        prune(build_tiny("vit"), PruneConfig(mlp=0.5, recovery=False), input_size=(3, 32, 32))
    with pytest.raises(PruneError, match=r"\[0, 1\)"):
        PruneConfig(heads=1.0)
    with pytest.raises(PruneError, match="criterion"):
        PruneConfig(criterion="taylor")


@pytest.mark.parametrize("family", ["vit", "dinov2", "swin"])
def test_saved_pruned_card_reloads_to_the_same_model(family: str, tmp_path: Path) -> None:
    _, result = pruned_tiny(family, unstructured=0.2)
    out, summary = save_pruned_run(tmp_path / "run", result, spec_for(family))
    assert sorted(p.name for p in out.iterdir()) == [
        "model.json",
        "model.safetensors",
        "scores.json",
        "summary.json",
        "summary.txt",
    ]
    assert summary["sparsity"]["sparsity"] == pytest.approx(0.2, abs=1e-3)
    x = tiny_input(family, seed=7)
    with torch.no_grad():
        expected = result.model(x)
        for name in (out / "model.json", out):  # the card, or the run directory standing for it
            spec = resolve_model(str(name))
            assert spec.pruning == result.structure.to_json_dict()
            assert torch.equal(build_model(spec)(x), expected)
        card = json.loads((out / "model.json").read_text())  # plain timm + the structure, no lrpq loader
        model = timm.create_model(card["timm_name"], pretrained=False, **card["kwargs"])
        apply_structure(model, PrunedStructure.from_json_dict(card["pruning"]))
        model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
        assert torch.equal(model.eval()(x), expected)
    assert spec.to_json_dict() == ModelSpec.from_json_dict(spec.to_json_dict()).to_json_dict()


def test_a_card_with_a_broken_structure_is_named(tmp_path: Path) -> None:
    _, result = pruned_tiny("vit", recovery=False)
    out, _ = save_pruned_run(tmp_path / "run", result, spec_for("vit"))
    card = json.loads((out / "model.json").read_text())
    card["pruning"]["blocks"]["blocks.0"]["heads"] = [5]
    (out / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"model\.json: pruning: .*below 2"):
        resolve_model(str(out))


def test_pruning_a_pruned_card_composes_the_structures(tmp_path: Path) -> None:
    _, first = pruned_tiny("vit", heads=0.0, mlp=0.5)
    out, _ = save_pruned_run(tmp_path / "once", first, spec_for("vit"))
    spec = resolve_model(str(out))
    model = build_model(spec)
    second = prune(model, PruneConfig(mlp=0.5, criterion="l1", recovery=False), input_size=(3, 32, 32))
    out2, _ = save_pruned_run(tmp_path / "twice", second, spec)
    again = build_model(resolve_model(str(out2)))
    assert [b.mlp.fc1.out_features for b in prunable_blocks(again).values()] == [48, 48]
    x = tiny_input("vit", seed=8)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("family", ["vit", "dinov2", "swin"])
def test_pruned_models_explain_and_quantize(family: str, tmp_path: Path) -> None:
    _, result = pruned_tiny(family, "random")
    pruned = result.model
    x = tiny_input(family, batch=4, seed=9)
    explanation = explain(pruned, x)
    assert torch.isfinite(explanation.input_relevance).all()
    quantized = quantize(copy.deepcopy(pruned), QuantConfig(6, 6), x, progress=False)
    with torch.no_grad():
        reference, output = pruned(x), quantized(x)
    assert (output - reference).square().mean() < 0.1 * reference.square().mean()
    spec = spec_for(family)
    spec = ModelSpec(**{**spec.to_json_dict(), "pruning": result.structure.to_json_dict()})
    save_run(tmp_path / "q", quantized, spec, QuantConfig(6, 6), {"note": "test"})
    loaded, loaded_spec, _ = load_run(tmp_path / "q")
    assert loaded_spec.pruning == spec.pruning
    with torch.no_grad():
        assert torch.equal(loaded(x), output)


def test_ref_a_prunes_to_the_documented_widths_and_reloads(shared_dir: Path, tmp_path: Path) -> None:
    spec = resolve_model(str(shared_dir / "models/vit_cifar10.json"))
    model = build_model(spec)
    config = PruneConfig(heads=0.25, mlp=0.3, criterion="l1", recovery=False)
    result = prune(model, config, input_size=spec.data_config["input_size"], progress=False)
    assert result.structure.counts() == {f"blocks.{i}": {"heads": 3, "hidden": 538} for i in range(6)}
    assert result.before.params - result.after.params == 6 * 230 * (192 + 1 + 192)  # fc1 rows and fc2 columns
    out, _ = save_pruned_run(tmp_path / "ref-a", result, spec)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(build_model(resolve_model(str(out)))(x), model(x))
