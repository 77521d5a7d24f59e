"""``lrpq bench``: calibration, relevance, fake-quant inference, memory and file size, each as a ratio.

The machine is shared, so absolute timings drift with its load. Every number is therefore a ratio of
two measurements taken in the same run (quantized or relevance against float), timings are medians
of ``repeats`` runs, and float and quantized runs alternate so that a change of load hits both.

Per model (random weights, random 224 px images):

* ``calibration_ratio``: ``quantize`` on the calibration batch over one float forward of that batch.
  Each sample runs in a fresh subprocess, which also measures the calibration peak memory and, after
  it, one float forward of an untouched copy of the model.
* ``calibration_memory_ratio``: increase of peak resident memory (``ru_maxrss``) over the process's
  peak after loading the model and images, during calibration, over the same increase during a float
  evaluation of the same batch (``lrpq.evaluate`` in inference mode), each in a fresh subprocess.
* ``fakequant_throughput_ratio``: float forward time over fake-quant forward time, inference mode,
  same batch. The quantized model is the one the first calibration subprocess wrote with
  ``save_packed`` and this process loaded back, so the packed export is exercised too.
* ``relevance_ratio``: ``compute_layer_scores`` per image over one float forward + backward per image
  (parameter gradients included), on the same few images.
* ``w4_size_ratio``: size of the packed W4A4 file over the float32 safetensors of the float state dict.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lrpq.api import convert, prepare, quantize, set_mode
from lrpq.config import QuantConfig
from lrpq.errors import LrpqError
from lrpq.evaluate import evaluate
from lrpq.export import load_packed_state, save_packed
from lrpq.models import ModelSpec, build_model, resolve_model
from lrpq.quantizers import QuantMode

DEFAULT_MODELS = ("deit_s", "swin_t")
BENCH_CONFIG = QuantConfig(wbits=4, abits=4)
SEED = 0

# metric → (comparison, target) from the performance issue; the table marks each value against it.
TARGETS: dict[str, tuple[str, float]] = {
    "calibration_ratio": ("<=", 10.0),
    "relevance_ratio": ("<=", 3.0),
    "fakequant_throughput_ratio": (">=", 0.6),
    "calibration_memory_ratio": ("<=", 2.0),
    "w4_size_ratio": ("<=", 0.2),
}

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _float_model(name: str) -> tuple[nn.Module, ModelSpec]:
    """The float model behind an alias or timm name, with random (not downloaded) weights."""
    spec = dataclasses.replace(resolve_model(name), pretrained=False)
    torch.manual_seed(SEED)
    return build_model(spec), spec


def _images(spec: ModelSpec, count: int) -> torch.Tensor:
    """Standard-normal images of the model's input size: what normalised images roughly look like."""
    return torch.randn(count, *spec.data_config["input_size"], generator=torch.Generator().manual_seed(SEED))


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _peak_kib() -> int:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- subprocess probes: a fresh process per peak-memory measurement ------------------------------


def probe(task: str, model_name: str, images: int, packed_path: str | None = None) -> dict[str, float]:
    """Run one ``task`` ("calibrate" or "evaluate") and report peak memory over the loaded baseline.

    ``calibrate`` also times the calibration and then one float forward of a copy of the model taken
    before it, so its time ratio comes from one process, and optionally saves the packed model.
    """
    model, spec = _float_model(model_name)
    x = _images(spec, images)
    result: dict[str, float] = {}
    if task == "evaluate":
        labels = torch.zeros(images, dtype=torch.long)
        baseline = _peak_kib()
        evaluate(model, [(x, labels)], progress=False)
        result["peak_increase_kib"] = _peak_kib() - baseline
    elif task == "calibrate":
        reference = copy.deepcopy(model)
        baseline = _peak_kib()
        result["calibration_s"] = _seconds(lambda: quantize(model, BENCH_CONFIG, x, progress=False))
        result["peak_increase_kib"] = _peak_kib() - baseline
        with torch.inference_mode():
            result["float_forward_s"] = _seconds(lambda: reference(x))
        if packed_path is not None:
            save_packed(model, packed_path)
    else:
        raise LrpqError(f"unknown benchmark probe task {task!r}")
    result["baseline_kib"] = baseline
    return result


def _probe_main() -> None:
    """Entry point of a probe subprocess: JSON arguments in argv[1], JSON result on the last stdout line."""
    print(json.dumps(probe(**json.loads(sys.argv[1]))))


def _run_probe(task: str, model_name: str, images: int, packed_path: Path | None = None) -> dict[str, float]:
    arguments = {"task": task, "model_name": model_name, "images": images}
    if packed_path is not None:
        arguments["packed_path"] = str(packed_path)
    command = [sys.executable, "-c", "from lrpq.bench import _probe_main; _probe_main()", json.dumps(arguments)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        tail = "\n".join(finished.stderr.strip().splitlines()[-5:])
        raise LrpqError(f"benchmark probe '{task}' for {model_name} failed:\n{tail}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


# --- in-process timings --------------------------------------------------------------------------


def _alternating(first: Callable[[], object], second: Callable[[], object], repeats: int) -> list[tuple[float, float]]:
    """``repeats`` (first, second) timings, alternating the two so that load drift hits both alike."""
    return [(_seconds(first), _seconds(second)) for _ in range(repeats)]


def _median_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    return statistics.median(numerator / denominator for numerator, denominator in pairs)


def _median_seconds(pairs: Sequence[tuple[float, float]], which: int) -> float:
    return statistics.median(pair[which] for pair in pairs)


def _quantized_from_packed(float_model: nn.Module, packed: Path) -> nn.Module:
    """Rebuild the fake-quant model from a packed file, as ``lrpq.runs.load_run`` does from a run."""
    model = convert(prepare(copy.deepcopy(float_model), BENCH_CONFIG))
    model.load_state_dict(load_packed_state(packed), strict=True)
    set_mode(model, QuantMode.QUANT)
    return model.eval()


def _forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).max(dim=1).values.sum().backward()


def _relevance_pairs(model: nn.Module, x: torch.Tensor, repeats: int) -> list[tuple[float, float]]:
    """(``compute_layer_scores``, float forward + backward) timings on the same images."""
    from lrpq.relevance import compute_layer_scores  # scipy and friends: not needed by the probes

    _forward_backward(model, x)  # warm-up of the kernels both use
    pairs = _alternating(
        lambda: compute_layer_scores(model, x, progress=False), lambda: _forward_backward(model, x), repeats
    )
    model.zero_grad(set_to_none=True)
    return pairs


def measure_model(name: str, repeats: int, images: int, relevance_images: int, log: Log = _stderr) -> dict[str, float]:
    """The five ratios of one model; progress and the underlying measurements go to ``log``."""
    with tempfile.TemporaryDirectory(prefix="lrpq-bench-") as folder:
        packed = Path(folder) / "w4.packed.safetensors"
        calibrations = []
        for index in range(repeats):
            log(f"[{name}] calibration {index + 1}/{repeats} (fresh process)")
            calibrations.append(_run_probe("calibrate", name, images, packed if index == 0 else None))
            sample = calibrations[-1]
            log(f"  calibration {sample['calibration_s']:.1f} s, float forward {sample['float_forward_s']:.2f} s")
        log(f"[{name}] float evaluation memory (fresh process)")
        evaluation = _run_probe("evaluate", name, images)
        calibration_kib = statistics.median(sample["peak_increase_kib"] for sample in calibrations)
        log(
            f"  peak RSS increase over the loaded model: calibration {calibration_kib / 1024:.0f} MiB, "
            f"float evaluation {evaluation['peak_increase_kib'] / 1024:.0f} MiB "
            f"(baseline {evaluation['baseline_kib'] / 1024:.0f} MiB)"
        )

        float_model, spec = _float_model(name)
        x = _images(spec, images)
        quantized = _quantized_from_packed(float_model, packed)
        log(f"[{name}] float vs fake-quant forward, {repeats} alternating runs after a warm-up")
        with torch.inference_mode():
            float_model(x), quantized(x)  # warm-up; fills the fake-quant weight cache
            forwards = _alternating(lambda: float_model(x), lambda: quantized(x), repeats)
        log(f"  float {_median_seconds(forwards, 0):.2f} s, fake-quant {_median_seconds(forwards, 1):.2f} s")

        log(f"[{name}] relevance vs float forward + backward on {relevance_images} images, {repeats} runs")
        relevance = _relevance_pairs(float_model, x[:relevance_images], repeats)
        log(f"  relevance {_median_seconds(relevance, 0):.2f} s, fwd+bwd {_median_seconds(relevance, 1):.2f} s")

        float_file = Path(folder) / "float.safetensors"
        save_file({key: value.contiguous() for key, value in float_model.state_dict().items()}, str(float_file))
        sizes = (packed.stat().st_size, float_file.stat().st_size)
        log(f"[{name}] packed W4 file {sizes[0] / 2**20:.1f} MiB, float32 file {sizes[1] / 2**20:.1f} MiB")

    return {
        "calibration_ratio": statistics.median(s["calibration_s"] / s["float_forward_s"] for s in calibrations),
        "relevance_ratio": _median_ratio(relevance),
        "fakequant_throughput_ratio": _median_ratio(forwards),
        "calibration_memory_ratio": calibration_kib / evaluation["peak_increase_kib"],
        "w4_size_ratio": sizes[0] / sizes[1],
    }


def run_benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    repeats: int = 3,
    images: int = 32,
    relevance_images: int = 2,
    log: Log = _stderr,
) -> dict[str, dict[str, float]]:
    """``{model: {metric: ratio}}`` for every model, metrics as in ``TARGETS``."""
    return {name: measure_model(name, repeats, images, relevance_images, log) for name in models}


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One row per metric, one column per model, each value marked against its target."""
    models = list(results)
    header = f"{'metric':<28}" + "".join(f"{name:>16}" for name in models) + f"{'target':>10}"
    lines = [header, "-" * len(header)]
    for metric, (comparison, target) in TARGETS.items():
        cells = []
        for name in models:
            value = results[name][metric]
            met = value <= target if comparison == "<=" else value >= target
            cells.append(f"{value:>12.3f} {'ok' if met else 'NO':>3}")
        lines.append(f"{metric:<28}" + "".join(cells) + f"{comparison + ' ' + format(target, 'g'):>10}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lrpq bench`` and ``scripts/bench.py``."""
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="aliases or timm names")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the median is reported")
    parser.add_argument("--images", type=int, default=32, help="calibration / evaluation batch (default 32)")
    parser.add_argument("--relevance-images", type=int, default=2, help="images for the relevance timing")
    parser.add_argument("--json", help="also write the ratios to this JSON file")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON to stdout (progress goes to stderr)."""
    if args.repeats < 1 or args.images < 1 or not 1 <= args.relevance_images <= args.images:
        raise LrpqError("--repeats and --images must be positive and --relevance-images within 1..--images")
    start = time.perf_counter()
    results = run_benchmark(args.models, args.repeats, args.images, args.relevance_images)
    payload = json.dumps(results, indent=2)
    print(format_table(results))
    print(payload)
    if args.json:
        Path(args.json).write_text(payload + "\n")
    _stderr(f"benchmark finished in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except LrpqError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
