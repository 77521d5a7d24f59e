"""Running ``lrpq`` in-process and checking its one-line errors, for every CLI test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrpq.cli import main


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
