"""Device handling: every tensor lrpq creates follows the model's device.

This machine has no GPU, so the proof is by construction and by fake tensors: the whole ``quantize``
and inference path runs under ``FakeTensorMode`` on a fake ``cuda`` device, where any operation that
mixes a CPU tensor with a device tensor fails, exactly as it would on a real GPU. Only the steps
that read data back to decide something cannot run on fake tensors; the test swaps those (listed
in ``DATA_DEPENDENT_STEPS``) for shape-only stand-ins, and every other line of lrpq runs as is.
"""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch
from conftest import build_tiny, tiny_input
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import lrpq.observers
import lrpq.primitives
import lrpq.quantizers
from lrpq.api import quantize
from lrpq.cli import main
from lrpq.config import QuantConfig
from lrpq.devices import DeviceError, add_device_argument, loader_options, resolve_device
from lrpq.modules import _WeightCache

# Checks of the data itself (NaN/Inf, offsets that fit int8) and the exactness fallback of the
# piecewise top-k: each reads a value back, which a fake tensor does not have.
DATA_DEPENDENT_STEPS = {
    (lrpq.observers, "require_finite"): lambda x, where: None,
    (lrpq.quantizers, "require_offsets_fit"): lambda offset, dtype, name: None,
    (lrpq.primitives, "_tail"): lambda flat, k, largest: torch.topk(flat, k, largest=largest, sorted=True).values,
}


@pytest.fixture
def shape_only_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DATA_DEPENDENT_STEPS`` swapped for their stand-ins, so lrpq runs on fake tensors."""
    for (module, name), stand_in in DATA_DEPENDENT_STEPS.items():
        monkeypatch.setattr(module, name, stand_in)


def test_auto_takes_cuda_then_mps_then_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_an_unavailable_device_fails_naming_the_available_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"^device 'cuda' is not available on this machine; available: cpu$"):
        resolve_device("cuda")


@pytest.mark.parametrize("command", [["quantize", "deit_s", "--wbits", "4"], ["eval", "x", "--data", "y"]])
def test_every_command_refuses_an_unavailable_device_in_one_line(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main([*command, "--device", "mps"]) == 2
    assert capsys.readouterr().err.strip().endswith("device 'mps' is not available on this machine; available: cpu")


def test_relevance_and_bench_take_a_device() -> None:
    from lrpq.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["relevance", "m", "--data", "d", "--out", "o", "--device", "cpu"]).device == "cpu"
    assert parser.parse_args(["bench", "--device", "cpu"]).device == "cpu"
    bare = argparse.ArgumentParser()
    add_device_argument(bare)
    assert bare.parse_args([]).device == "auto"


def test_batches_for_a_gpu_are_pinned_and_loaded_by_workers() -> None:
    assert loader_options(torch.device("cpu"), None) == {"num_workers": 0, "pin_memory": False}
    on_gpu = loader_options(torch.device("cuda"), None)
    assert on_gpu["pin_memory"] and on_gpu["num_workers"] >= 1
    assert loader_options(torch.device("cuda"), 2)["num_workers"] == 2


def on_fake_device(model: nn.Module, mode: FakeTensorMode, device: str) -> nn.Module:
    """``model`` with every parameter and buffer replaced by a fake tensor of the same shape on ``device``."""
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                fake = mode.from_tensor(parameter).to(device)
                module._parameters[name] = nn.Parameter(fake, parameter.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = mode.from_tensor(buffer).to(device)
    return model


def module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor held by a module: parameters, buffers and plain attributes, by qualified name."""
    found = {}
    for prefix, module in model.named_modules():
        held = {**module._parameters, **module._buffers, **vars(module)}
        for name, value in held.items():
            if isinstance(value, torch.Tensor):
                found[f"{prefix}.{name}"] = value
    return found


# range_metric='output' is left out: a backward pass on fake 'cuda' tensors asks the autograd engine
# for a real CUDA context. Its runner moves the batch with ``model_device`` like every other pass.
# GPTQ runs on vit and dinov2: its column sweep is thousands of small operations, each slow on fake
# tensors, and it is the same code for every family.
@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("vit", QuantConfig(4, 4)),
        ("swin", QuantConfig(4, 4, gptq=False)),
        ("dinov2", QuantConfig(4, 4, bias_correction=True)),
        ("deit_distilled", QuantConfig(4, 4, calibrate_on_quantized=True, gptq=False)),
    ],
)
@pytest.mark.usefixtures("shape_only_steps")
def test_quantize_and_inference_create_every_tensor_on_the_model_device(family: str, config: QuantConfig) -> None:
    device = "cuda"
    model, images = build_tiny(family), tiny_input(family, 4)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        model = on_fake_device(model, mode, device)
        calib = mode.from_tensor(images)  # on the CPU, as the CLI loads it: batches are moved by lrpq
        quantize(model, config, calib, batch_size=2, progress=False)
        with torch.inference_mode():
            logits = model(calib.to(device))
    assert logits.device.type == device and logits.shape == (4, 5)
    on_cpu = [name for name, tensor in module_tensors(model).items() if tensor.device.type != device]
    assert not on_cpu, f"left on the CPU: {on_cpu[:5]}"


@pytest.mark.usefixtures("shape_only_steps")
def test_the_weight_cache_leaves_fake_tensors_alone() -> None:
    """``torch.compile`` traces with fake tensors, which have no data pointer to key the cache on."""
    model = quantize(build_tiny("vit"), QuantConfig(4, 4), tiny_input("vit", 4), progress=False)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode, warnings.catch_warnings():
        warnings.simplefilter("error")  # reading a fake tensor's data pointer warns
        model = on_fake_device(model, mode, "cuda")
        with torch.inference_mode():
            logits = model(mode.from_tensor(tiny_input("vit", 2)).to("cuda"))
    assert logits.shape == (2, 5)
    caches = [m._weight_cache for m in model.modules() if hasattr(m, "_weight_cache")]
    assert caches and all(cache._value is None for cache in caches)


def test_every_tensor_of_a_quantized_model_is_a_parameter_or_a_buffer() -> None:
    """So ``model.to(device)`` moves all of it; the weight cache re-keys on the moved tensors."""
    model = quantize(build_tiny("vit"), QuantConfig(4, 4), tiny_input("vit", 4), progress=False)
    with torch.inference_mode():
        model(tiny_input("vit", 1))  # fills the weight caches
    registered = {id(t) for t in (*model.parameters(), *model.buffers())}
    loose = [name for name, tensor in module_tensors(model).items() if id(tensor) not in registered]
    assert not loose, f"tensors outside the state: {loose[:5]}"
    assert all(
        isinstance(cache, _WeightCache)
        for cache in (m._weight_cache for m in model.modules() if hasattr(m, "_weight_cache"))
    )
    model.to("meta")
    assert {t.device.type for t in module_tensors(model).values()} == {"meta"}
