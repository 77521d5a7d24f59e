"""Run directories: what ``lrpq quantize`` writes and ``lrpq eval RUN_DIR`` reads back.

A run directory holds ``model.safetensors`` (the fake-quant state: folded weights and quantizer
buffers; its metadata records every quantizer's bit width), ``model.packed.safetensors`` (the same
state with weights as packed low-bit integers), ``config.json`` (model spec + quantization config),
``bits.json`` (the effective bit plan, reusable with ``--bit-plan``) and a human-readable
``summary.txt`` beside ``summary.json``. It is written into a hidden sibling folder and renamed at the
end (``lrpq.outputs``), so a failed run leaves nothing, and ``--overwrite`` replaces only a run directory.

Reading one back checks every file against the others before the model is used: a damaged or edited
run is refused in one line rather than evaluated with the wrong bits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lrpq.api import convert, prepare, quant_layers, quantizers, set_mode
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.errors import LrpqError
from lrpq.export import PACKED_FILE, ExportError, packed_weight_bits, save_packed
from lrpq.models import ModelError, ModelSpec, build_model, check_input_size
from lrpq.modules import QuantConv2d, QuantLinear, QuantMatMul
from lrpq.outputs import staged_dir
from lrpq.quantizers import QuantMode, UniformQuantizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BITS_FILE = "bits.json"
SUMMARY_FILES = ("summary.json", "summary.txt")
RUN_FILES = (CONFIG_FILE, MODEL_FILE, PACKED_FILE, BITS_FILE, *SUMMARY_FILES)
BITS_METADATA_KEY = "lrpq_quantizer_bits"
AGAIN = "quantize the model again"
# What building a model from a damaged or edited config.json raises (timm asserts, rejects kwargs, …).
_BUILD_ERRORS = (LrpqError, RuntimeError, TypeError, ValueError, KeyError, AssertionError)


class RunError(LrpqError):
    """A run directory that cannot be read back: a file missing, damaged, or not matching the others."""


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / MODEL_FILE).is_file()


def has_run_files(path: str | Path) -> bool:
    """A folder holding any file of a run directory: a run, perhaps a damaged one, not a model name."""
    return Path(path).is_dir() and any((Path(path) / name).exists() for name in RUN_FILES)


def is_lrpq_run(path: str | Path) -> bool:
    """A run directory lrpq wrote, which ``--overwrite`` may replace.

    config.json and model.safetensors alone do not say so (a Hugging Face model folder holds both);
    lrpq's config.json has the model and quant sections.
    """
    if not is_run_dir(path):
        return False
    try:
        payload = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and {"model", "quant"} <= payload.keys()


@contextmanager
def staged_run_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden folder beside ``target``, made now, that becomes the run directory ``target`` on success.

    A whole ``lrpq quantize`` runs inside it, so an unusable ``--out`` fails before calibration.
    """
    with staged_dir(target, what="run directory", overwrite=overwrite, replaceable=is_lrpq_run) as staging:
        yield staging


def effective_plan(model: nn.Module, config: QuantConfig) -> BitPlan:
    """The bits every quantized layer actually uses, read from its quantizers (matmuls have no weights)."""
    plan = {}
    for name, layer in quant_layers(model).items():
        if isinstance(layer, QuantMatMul):
            plan[name] = LayerBits(config.bits_for(name).wbits, layer.a_quantizer.bits)
        else:
            plan[name] = LayerBits(layer.weight_quantizer.bits, layer.input_quantizer.bits)
    return BitPlan(plan)


def write_run(
    folder: Path,
    model: nn.Module,
    spec: ModelSpec,
    config: QuantConfig,
    summary: dict[str, Any],
    sections: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the files of a run directory into ``folder`` (a staging folder: see ``staged_run_dir``).

    Returns the summary as written: ``summary`` and the packed file's size in bytes. ``sections`` are
    more config.json sections that say how the model was made (e.g. ``recovery``); loading reads only
    the model and quant sections, since the state dict holds everything else.
    """
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    bits = {name: quantizer.bits for name, quantizer in quantizers(model).items()}
    save_file(state, str(folder / MODEL_FILE), metadata={BITS_METADATA_KEY: json.dumps(bits)})
    save_packed(model, folder / PACKED_FILE)
    summary = {**summary, "packed_bytes": (folder / PACKED_FILE).stat().st_size}
    payload = {"model": spec.to_json_dict(), "quant": config.to_json_dict(), **(sections or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    plan = effective_plan(model, config)
    plan.save(folder / BITS_FILE)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.txt").write_text(format_summary(summary, plan))
    return summary


def save_run(
    out_dir: str | Path,
    model: nn.Module,
    spec: ModelSpec,
    config: QuantConfig,
    summary: dict[str, Any],
    *,
    overwrite: bool = False,
    extra_files: Callable[[Path], None] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete run directory atomically; ``extra_files(staging)`` may add more files."""
    with staged_run_dir(out_dir, overwrite) as staging:
        write_run(staging, model, spec, config, summary, sections)
        if extra_files is not None:
            extra_files(staging)
    return Path(out_dir)


def _reason(error: BaseException) -> str:
    """An exception as one line: lrpq's own messages as they are, others with their type."""
    text = str(error) if isinstance(error, LrpqError) else f"{type(error).__name__}: {error}"
    return text.splitlines()[0] if text else type(error).__name__


def _require_files(run_dir: Path) -> None:
    if not has_run_files(run_dir):
        raise RunError(f"{run_dir} is not a run directory (expected {CONFIG_FILE} and {MODEL_FILE})")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir} is a damaged run directory: {name} is missing; {AGAIN}")


def _read_config(path: Path) -> tuple[ModelSpec, QuantConfig, nn.Module]:
    """The spec and config of ``config.json`` and the (unquantized, uncalibrated) model they describe."""
    try:
        payload = json.loads(path.read_text())
    except OSError as error:
        raise RunError(f"{path} cannot be read: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is damaged: not valid JSON ({error}); {AGAIN}") from None
    if not isinstance(payload, dict) or not all(isinstance(payload.get(key), dict) for key in ("model", "quant")):
        raise RunError(f"{path} is damaged: it lacks the model and quant sections lrpq writes; {AGAIN}")
    try:
        spec = ModelSpec.from_json_dict(payload["model"])
        config = QuantConfig.from_json_dict(payload["quant"])
    except (LrpqError, TypeError, ValueError, AttributeError) as error:
        raise RunError(f"{path} is damaged: {_reason(error)}; {AGAIN}") from None
    try:
        check_input_size(spec.timm_name, spec.kwargs, spec.data_config, str(path))
    except ModelError as error:
        raise RunError(f"{error}; {AGAIN}") from None
    try:
        architecture = ModelSpec.from_json_dict({**payload["model"], "checkpoint": None, "pretrained": False})
        model = convert(prepare(build_model(architecture), config))
    except _BUILD_ERRORS as error:
        raise RunError(f"{path} describes a model lrpq cannot build ({_reason(error)}); {AGAIN}") from None
    return spec, config, model


def _read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``model.safetensors``, or one line saying why they cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            return {key: handle.get_tensor(key) for key in names}, handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise RunError(f"{path} is damaged: {_reason(error)}; {AGAIN}") from None


def _check_tensors(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """The file holds exactly the model's tensors, each with the model's shape and dtype."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:  # e.g. a run written by an lrpq whose layers held other tensors
        which = f"lacks {missing[0]!r}" if missing else f"has an unknown {unexpected[0]!r}"
        raise RunError(f"{path} {which}: it was not written by this lrpq; {AGAIN}")
    for key, tensor in expected.items():
        stored = state[key]
        if stored.shape != tensor.shape or stored.dtype != tensor.dtype:
            raise RunError(
                f"{path}: {key} is {str(stored.dtype).removeprefix('torch.')} {tuple(stored.shape)} but the model "
                f"of {CONFIG_FILE} needs {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}; {AGAIN}"
            )


def _check_bits(given: Mapping[str, int], stored: Mapping[str, Any], what: str, path: Path) -> None:
    """The widths config.json gives every quantizer (or packed weight) are the ones ``path`` was written with."""
    for name in sorted(given.keys() | stored.keys()):
        if given.get(name) != stored.get(name):
            raise RunError(
                f"{path.parent / CONFIG_FILE} gives {what} {name} {given.get(name)} bits but {path} was written "
                f"with {stored.get(name)}: {CONFIG_FILE} was edited or belongs to another run; {AGAIN}"
            )


def _stored_quantizer_bits(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    if BITS_METADATA_KEY not in metadata:
        raise RunError(f"{path} was written by an older lrpq (it does not record its bit widths); {AGAIN}")
    try:
        stored = json.loads(metadata[BITS_METADATA_KEY])
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict):
        raise RunError(f"{path} is damaged: its '{BITS_METADATA_KEY}' metadata is not a JSON object; {AGAIN}")
    return stored


def _check_quantizer_parameters(model: nn.Module, path: Path) -> None:
    """Scales positive and finite; uniform zero points integers on the grid of their width, [0, 2^b − 1]."""
    for name, quantizer in quantizers(model).items():
        scale = quantizer.scale
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise RunError(f"{path}: {name} has a scale that is not positive and finite; {AGAIN}")
        if not isinstance(quantizer, UniformQuantizer):
            continue
        zero_point, levels = quantizer.zero_point, 2**quantizer.bits - 1
        outside = ~torch.isfinite(zero_point) | (zero_point < 0) | (zero_point > levels)
        outside |= zero_point != zero_point.round()
        if outside.any():
            value = zero_point[outside].flatten()[0].item()
            raise RunError(
                f"{path}: {name} has zero point {value:g}, not an integer in 0…{levels} for its {quantizer.bits} "
                f"bits in {CONFIG_FILE}; {AGAIN}"
            )


def _check_packed_file(model: nn.Module, path: Path) -> None:
    """The packed file, when present, packs every quantized weight at the width config.json gives it."""
    try:
        stored = packed_weight_bits(path)
    except ExportError as error:  # names the file already
        raise RunError(f"{error}; {AGAIN}") from None
    except (SafetensorError, OSError) as error:
        raise RunError(f"{path} is damaged: {_reason(error)}; {AGAIN}") from None
    given = {
        f"{name}.weight": layer.weight_quantizer.bits
        for name, layer in quant_layers(model).items()
        if isinstance(layer, QuantLinear | QuantConv2d)
    }
    _check_bits(given, stored, "weight", path)


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec, QuantConfig]:
    """Rebuild the quantized model of a run directory (no calibration data needed).

    Every file is checked against the others first: tensors against the model config.json describes,
    bit widths against the ones model.safetensors (and the packed file) were written with, and
    quantizer parameters against their widths; any damage or mismatch is a RunError naming the file.
    """
    run_dir = Path(run_dir)
    _require_files(run_dir)
    spec, config, model = _read_config(run_dir / CONFIG_FILE)
    model_file = run_dir / MODEL_FILE
    state, metadata = _read_model_file(model_file)
    _check_tensors(model, state, model_file)
    given = {name: quantizer.bits for name, quantizer in quantizers(model).items()}
    _check_bits(given, _stored_quantizer_bits(metadata, model_file), "quantizer", model_file)
    if (run_dir / PACKED_FILE).exists():
        _check_packed_file(model, run_dir / PACKED_FILE)
    model.load_state_dict(state, strict=True)
    _check_quantizer_parameters(model, model_file)
    set_mode(model, QuantMode.QUANT)
    return model.to(device).eval(), spec, config  # every tensor of the model is a parameter or buffer


def format_summary(summary: dict[str, Any], plan: BitPlan) -> str:
    """A plain-text summary: run facts, then one row per layer with its bits."""
    lines = [f"{key:<20} {value}" for key, value in summary.items() if not isinstance(value, dict | list)]
    width = max((len(name) for name in plan.layers), default=5)
    lines += ["", f"{'layer':<{width}}  wbits  abits", f"{'-' * width}  -----  -----"]
    lines += [f"{name:<{width}}  {bits.wbits:>5}  {bits.abits:>5}" for name, bits in plan.layers.items()]
    return "\n".join(lines) + "\n"
