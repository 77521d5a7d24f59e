"""Run directories: what ``lrpq quantize`` writes and ``lrpq eval RUN_DIR`` reads back.

A run directory holds ``model.safetensors`` (the fake-quant state: folded weights and quantizer
buffers), ``model.packed.safetensors`` (the same state with weights as packed low-bit integers),
``config.json`` (model spec + quantization config), ``bits.json`` (the effective bit plan, reusable
with ``--bit-plan``) and a human-readable ``summary.txt`` beside ``summary.json``. It is written into
a temporary sibling folder and renamed at the end, so a failed run leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lrpq.api import convert, prepare, quant_layers, set_mode
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.errors import LrpqError
from lrpq.export import PACKED_FILE, save_packed
from lrpq.models import ModelSpec, build_model
from lrpq.modules import QuantMatMul
from lrpq.quantizers import QuantMode

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BITS_FILE = "bits.json"


class RunError(LrpqError):
    """A run directory that cannot be written or read."""


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / MODEL_FILE).is_file()


def check_writable(target: str | Path, overwrite: bool) -> None:
    """Fail before any work is done if the run directory would be refused at the end."""
    if Path(target).exists() and not overwrite:
        raise RunError(f"output folder {target} already exists; choose another --out or pass --overwrite")


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` only if the block succeeds."""
    target = Path(target)
    check_writable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def effective_plan(model: nn.Module, config: QuantConfig) -> BitPlan:
    """The bits every quantized layer actually uses, read from its quantizers (matmuls have no weights)."""
    plan = {}
    for name, layer in quant_layers(model).items():
        if isinstance(layer, QuantMatMul):
            plan[name] = LayerBits(config.bits_for(name).wbits, layer.a_quantizer.bits)
        else:
            plan[name] = LayerBits(layer.weight_quantizer.bits, layer.input_quantizer.bits)
    return BitPlan(plan)


def save_run(
    out_dir: str | Path,
    model: nn.Module,
    spec: ModelSpec,
    config: QuantConfig,
    summary: dict[str, Any],
    *,
    overwrite: bool = False,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete run directory atomically; ``extra_files(staging)`` may add more files."""
    with atomic_dir(out_dir, overwrite) as staging:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / MODEL_FILE))
        save_packed(model, staging / PACKED_FILE)
        payload = {"model": spec.to_json_dict(), "quant": config.to_json_dict()}
        (staging / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        plan = effective_plan(model, config)
        plan.save(staging / BITS_FILE)
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (staging / "summary.txt").write_text(format_summary(summary, plan))
        if extra_files is not None:
            extra_files(staging)
    return Path(out_dir)


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec, QuantConfig]:
    """Rebuild the quantized model of a run directory on ``device`` (no calibration data needed)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise RunError(f"{run_dir} is not a run directory (expected {CONFIG_FILE} and {MODEL_FILE})")
    payload = json.loads((run_dir / CONFIG_FILE).read_text())
    spec = ModelSpec.from_json_dict(payload["model"])
    config = QuantConfig.from_json_dict(payload["quant"])
    architecture = ModelSpec.from_json_dict({**payload["model"], "checkpoint": None, "pretrained": False})
    model = convert(prepare(build_model(architecture), config))
    state = load_file(str(run_dir / MODEL_FILE))
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:  # e.g. a run written by an lrpq whose layers held other tensors
        which = f"lacks {missing[0]!r}" if missing else f"has an unknown {unexpected[0]!r}"
        raise RunError(f"{run_dir / MODEL_FILE} {which}: it was not written by this lrpq; quantize the model again")
    model.load_state_dict(state, strict=True)
    set_mode(model, QuantMode.QUANT)
    return model.to(device).eval(), spec, config  # every tensor of the model is a parameter or buffer


def format_summary(summary: dict[str, Any], plan: BitPlan) -> str:
    """A plain-text summary: run facts, then one row per layer with its bits."""
    lines = [f"{key:<20} {value}" for key, value in summary.items() if not isinstance(value, dict | list)]
    width = max((len(name) for name in plan.layers), default=5)
    lines += ["", f"{'layer':<{width}}  wbits  abits", f"{'-' * width}  -----  -----"]
    lines += [f"{name:<{width}}  {bits.wbits:>5}  {bits.abits:>5}" for name, bits in plan.layers.items()]
    return "\n".join(lines) + "\n"
