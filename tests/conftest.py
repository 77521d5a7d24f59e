"""Shared fixtures: tiny timm models of every supported family and the path of the shared reference folder.

Models are built fresh for every call (``prepare``/``quantize`` rewrite them in place) and seeded, so two
calls with the same seed give the same weights. The models are tiny, so intra-op threads only add contention
on a loaded machine (measured: a tiny ViT forward takes ~0.4 s with 2 threads under load, ~10 ms with 1).

Tests marked ``shared`` run real-size models, whose matmuls do use every core: they get all of them.

The single end-to-end ``python -m lrpq`` subprocess of ``tests/cli/test_cli.py`` spends ~10 s of CPU importing torch
and timm; it is started as soon as collection ends so that start-up overlaps the in-process tests.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from lrpq.api import quantize, quantizers
from lrpq.calibrate import observe_inputs
from lrpq.cli import main
from lrpq.config import QuantConfig
from lrpq.noise_breakdown import snr_db
from lrpq.quantizers import QuantMode

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Tiny configurations: (timm name, kwargs, input shape (C, H, W)).
TINY_VIT = (
    "vit_tiny_patch16_224",
    {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_classes": 5},
    (3, 32, 32),
)
TINY_DEIT_DISTILLED = (
    "deit_tiny_distilled_patch16_224",
    {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_classes": 5},
    (3, 32, 32),
)
TINY_DINOV2 = (
    "vit_small_patch14_dinov2",
    {"img_size": 28, "patch_size": 14, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_classes": 5},
    (3, 28, 28),
)
TINY_SWIN = (
    "swin_tiny_patch4_window7_224",
    {"img_size": 56, "embed_dim": 24, "depths": (2, 2), "num_heads": (2, 2), "window_size": 7, "num_classes": 5},
    (3, 56, 56),
)
FAMILIES: dict[str, tuple[str, dict, tuple[int, int, int]]] = {
    "vit": TINY_VIT,
    "deit_distilled": TINY_DEIT_DISTILLED,
    "dinov2": TINY_DINOV2,
    "swin": TINY_SWIN,
}

ModelFactory = Callable[..., nn.Module]


def build_tiny(family: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of ``family`` in eval mode (random weights, seeded)."""
    timm_name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(timm_name, pretrained=False, **kwargs).eval()


def tiny_input(family: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Standard-normal images of the family's input size (what a normalised image roughly looks like)."""
    return torch.randn(batch, *FAMILIES[family][2], generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def all_cores_for_reference_models(request: pytest.FixtureRequest) -> Iterator[None]:
    """A ``shared`` test gets every core for its duration; the others keep the suite's one thread."""
    if request.node.get_closest_marker("shared") is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def shared_dir() -> Path:
    """The shared reference folder, or a skip when this machine does not have it."""
    if not SHARED.is_dir():
        pytest.skip(f"reference models/data not found at {SHARED}")
    return SHARED


# ---------------------------------------------------------------------------------- python -m lrpq, started early

PYTHON_M_LRPQ_TEST = "test_python_m_lrpq_exits_2_without_traceback"
MISSING_CARD = "missing_card.json"
_PYTHON_M_LRPQ = pytest.StashKey[tuple[subprocess.Popen, Path]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Launch ``python -m lrpq quantize <missing card>`` in an empty folder if the test that checks it will run."""
    if session.config.option.collectonly or not any(item.name == PYTHON_M_LRPQ_TEST for item in session.items):
        return
    folder = Path(tempfile.mkdtemp(prefix="lrpq-cli-"))
    process = subprocess.Popen(
        [sys.executable, "-m", "lrpq", "quantize", str(folder / MISSING_CARD), "--wbits", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    session.config.stash[_PYTHON_M_LRPQ] = (process, folder)


def pytest_sessionfinish(session: pytest.Session) -> None:
    started = session.config.stash.get(_PYTHON_M_LRPQ, None)
    if started is not None:
        process, folder = started
        if process.poll() is None:  # the test was deselected or the session stopped early
            process.kill()
            process.communicate()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def python_m_lrpq(request: pytest.FixtureRequest) -> Iterator[tuple[int, str, str, Path]]:
    """(exit status, stdout, stderr, working folder) of the early ``python -m lrpq`` run."""
    started = request.config.stash.get(_PYTHON_M_LRPQ, None)
    if started is None:
        pytest.skip("the python -m lrpq subprocess was not started (collect-only session)")
    process, folder = started
    stdout, stderr = process.communicate(timeout=300)
    yield process.returncode, stdout, stderr, folder


# Quantized reference models by (model, data, calibration images, config), the latest few: tests that
# compare a feature on and off share configurations (the unrotated W6A6 fold, the head-rotation pair), and
# quantizing ref-B is most of their time. A cached model is only read: point selections work on a copy.
_QUANTIZED: dict[tuple[str, str, int, str], nn.Module] = {}
_QUANTIZED_KEPT = 4


@functools.lru_cache(maxsize=2)  # consecutive tests share one (model, images); the model is only copied
def _float_reference(
    shared_dir: Path, model: str, data: str, calib_images: int, every: int
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float model, its seed-0 calibration draw, every n-th dev image and the float logits on them."""
    from lrpq.data import draw_calibration_set, list_images, load_calibration_images
    from lrpq.models import build_model, resolve_model

    spec = resolve_model(str(shared_dir / "models" / f"{model}.json"))
    float_model = build_model(spec)
    calib_paths = draw_calibration_set(shared_dir / "data" / data / "calib", calib_images, 0)
    calib = load_calibration_images(calib_paths, spec.data_config)
    dev = [path for path, _ in list_images(shared_dir / "data" / data / "dev")][::every]
    x = load_calibration_images(dev, spec.data_config)
    with torch.no_grad():
        return float_model, calib, x, float_model(x)


def reference_snrs(
    shared_dir: Path,
    model: str,
    data: str,
    calib_images: int,
    every: int,
    configs: dict[Hashable, QuantConfig],
    points: tuple[str, ...] | None = None,
) -> dict[Hashable, float]:
    """Logit SNR of each config on a shared reference model: seed-0 calibration draw, every n-th dev image.

    ``points``: only the quantizers whose names end with one of these stay on (the others are OFF).
    """
    float_model, calib, x, reference = _float_reference(shared_dir, model, data, calib_images, every)
    snrs = {}
    with torch.no_grad():
        for key, config in configs.items():
            cache_key = (model, data, calib_images, json.dumps(config.to_json_dict(), sort_keys=True))
            quantized = _QUANTIZED.pop(cache_key, None)
            if quantized is None:
                quantized = quantize(copy.deepcopy(float_model), config, calib, progress=False)
            _QUANTIZED[cache_key] = quantized  # the most recently used last
            while len(_QUANTIZED) > _QUANTIZED_KEPT:
                del _QUANTIZED[next(iter(_QUANTIZED))]
            if points is not None:
                quantized = copy.deepcopy(quantized)
                for name, quantizer in quantizers(quantized).items():
                    quantizer.mode = QuantMode.QUANT if name.endswith(points) else QuantMode.OFF
            snrs[key] = snr_db(reference, quantized(x))
    return snrs


class _Rows:
    """A ``lrpq.calibrate.Recorder`` that keeps a stream's token rows."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.parts.append(x.detach().reshape(-1, x.shape[-1]))


def reference_layer_inputs(
    shared_dir: Path, model: str, data: str, calib_images: int, every: int, layers: Sequence[str]
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The float reference model and the inputs of its ``layers`` (token rows) on the seed-0 calibration
    draw and on every n-th dev image (the images ``reference_snrs`` uses)."""
    float_model, calib, x, _ = _float_reference(shared_dir, model, data, calib_images, every)
    modules = {name: float_model.get_submodule(name) for name in layers}
    inputs = []
    for images in (calib, x):
        rows = {name: _Rows() for name in layers}
        with torch.no_grad(), observe_inputs(modules, rows):
            float_model(images)
        inputs.append({name: torch.cat(recorded.parts) for name, recorded in rows.items()})
    return float_model, inputs[0], inputs[1]


# Running ``lrpq`` in-process and checking its one-line errors, for every CLI test.


def run_cli(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``lrpq argv``; argparse's SystemExit counts as a status."""
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error_line(status: int, err: str, *named: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line, naming every one of ``named``; returns that line."""
    assert status == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for text in named:
        assert text in errors[0], (text, errors[0])
    return errors[0]


def write_class_images(data: Path, classes: Sequence[str], per_class: int = 4) -> Path:
    """``per_class`` random 32 px PNGs in one folder per class under ``data``, with a class-dependent colour cast."""
    rng = np.random.default_rng(0)
    for label, class_name in enumerate(classes):
        (data / class_name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            pixels[..., label] = 255 - 40 * i
            Image.fromarray(pixels).save(data / class_name / f"{i}.png")
    return data


def quantize_args(workspace: dict[str, Path], *extra: str | Path) -> list[str | Path]:
    """``lrpq quantize`` of the workspace's card at W8 on 4 of its images, then ``extra``."""
    return [
        "quantize",
        workspace["card"],
        "--wbits",
        "8",
        "--calib-data",
        workspace["data"],
        "--calib-size",
        "4",
        *extra,
    ]


def assert_codes_equal_but_near_boundaries(values: torch.Tensor, scale: torch.Tensor, exact: torch.Tensor) -> None:
    """``values / scale`` are the rounding of float64 ``exact`` (clamped as ``values``), but within 1e-4 of a tie.

    Reordering float32 arithmetic moves a value by a few ulps: only a value that close to a rounding
    boundary may land on the neighbouring level, and then on that one only.
    """
    codes = values / scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)  # on the grid
    codes = codes.round()
    expected = exact.round().clamp(codes.min().item(), codes.max().item())
    near_tie = ((exact - exact.floor()) - 0.5).abs() < 1e-4
    differs = codes.double() != expected
    assert not (differs & ~near_tie).any()
    assert ((codes.double() - expected).abs() <= 1).all()
    assert differs.double().mean() < 1e-3
