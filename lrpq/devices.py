"""Which device a command runs on: ``--device auto|cpu|cuda|mps`` for every command, resolved in one place.

``auto`` takes CUDA when it is available, else Apple's MPS, else the CPU. Asking for a device this
machine does not have fails at once with one line naming the ones it has, before any model is built.
Everything lrpq creates follows the model's device (quantizer buffers, rotations, GPTQ's matrices),
so a command only has to put the model and its batches there.
"""

from __future__ import annotations

import argparse
import os

import torch

from lrpq.errors import LrpqError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(LrpqError):
    """A device that this machine does not have."""


def available_devices() -> list[str]:
    """The device types a model can run on here, CPU last."""
    devices = ["cuda"] if torch.cuda.is_available() else []
    if torch.backends.mps.is_available():
        devices.append("mps")
    return [*devices, "cpu"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first of CUDA, MPS, CPU that is available; any other name if it is available."""
    available = available_devices()
    if name == "auto":
        return torch.device(available[0])
    kind = torch.device(name).type
    if kind not in available:
        raise DeviceError(f"device '{name}' is not available on this machine; available: {', '.join(available)}")
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def loader_options(device: torch.device, workers: int | None) -> dict[str, object]:
    """DataLoader options for batches bound for ``device``: pinned memory and worker processes on a GPU.

    Decoding images in the main process would leave the GPU waiting between batches, and pinned
    (page-locked) batches copy to it asynchronously. ``workers`` (when given) wins.
    """
    on_gpu = device.type == "cuda"
    default = min(4, os.cpu_count() or 1) if on_gpu else 0
    return {"num_workers": default if workers is None else workers, "pin_memory": on_gpu}


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N or mps",
    )
