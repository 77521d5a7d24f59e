"""``recover``: distil the float teacher into the fake-quant student on the calibration images, end to end."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from itertools import pairwise

import torch
from torch import nn
from tqdm.auto import tqdm

from lrpq.distill import FeatureShapes, build_loss, extract_features
from lrpq.recovery.augment import augment
from lrpq.recovery.config import RecoveryConfig, RecoveryError
from lrpq.recovery.learnable import Trainable, learnable

CURVE_POINTS = 10
WARMUP = 0.1  # share of the steps over which the learning rates rise linearly, before the cosine decay


@dataclass(frozen=True)
class RecoveryReport:
    """How a recovery went: the loss over the steps (means of ``CURVE_POINTS`` equal windows), what it learned."""

    loss: str
    steps: int
    seconds: float
    curve: tuple[float, ...]
    learned: dict[str, int]  # values learned per group
    changed_levels: int  # quantized weights whose level differs from before recovery

    @property
    def first_loss(self) -> float:
        return self.curve[0]

    @property
    def last_loss(self) -> float:
        return self.curve[-1]

    def to_json_dict(self) -> dict[str, object]:
        return {**asdict(self), "curve": list(self.curve)}


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of ``batch_size`` images at a time, every image once per epoch in a fresh seeded order."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(count, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def learning_rate_factor(step: int, steps: int) -> float:
    """A linear warm-up over ``WARMUP`` of the steps, then a cosine decay to 0.

    Adam's first steps move every variable by about its full learning rate whatever its gradient (its
    second-moment estimate is still one batch); the warm-up keeps those first steps small.
    """
    warmup = max(1, round(WARMUP * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def relative_rate(parameter: torch.Tensor, rate: float) -> float:
    """``rate`` times the tensor's root mean square (``rate`` itself for a tensor of zeros).

    Adam moves every value by about its learning rate per step whatever its size, and the floats of
    a folded ViT span orders of magnitude (DINOv2's LayerScale ~1e-2, LayerNorm weights divided by
    the fold's channel factors): one absolute rate either freezes the small ones or wrecks them.
    """
    rms = parameter.detach().square().mean().sqrt().item()
    return rate * rms if rms > 0 else rate


class NormalisedSGD(torch.optim.Optimizer):
    """``p ← p − lr · g / rms(g)`` per tensor: a typical value moves ``lr`` per step, one with a k times larger
    gradient k times as far.

    The rounding variables need this rather than Adam: Adam moves every variable by about its rate,
    so all the weights that start at the same distance from a level change cross it in the same step
    (measured: a loss spike and a collapse of ref-B from 72 to 42 % in 20 steps), while here only the
    weights with a consistently strong gradient change level.
    """

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    rms = p.grad.square().mean().sqrt().clamp(min=1e-30)
                    p.sub_(p.grad, alpha=group["lr"] / rms.item())


def _optimisers(trainable: Trainable, loss: nn.Module, config: RecoveryConfig) -> list[torch.optim.Optimizer]:
    """Adam for the scales and, one group per tensor at its ``relative_rate``, the floats; the roundings apart."""
    floats = [*trainable.floats, *loss.parameters()]
    groups = [
        {"params": trainable.scales, "lr": config.lr_scales},
        *({"params": [p], "lr": relative_rate(p, config.lr_floats)} for p in floats),
    ]
    groups = [group for group in groups if group["params"]]
    optimisers: list[torch.optim.Optimizer] = [torch.optim.Adam(groups)] if groups else []
    if trainable.rounding:
        optimisers.append(NormalisedSGD(trainable.rounding_parameters, config.lr_rounding))
    return optimisers


def _curve(values: list[float]) -> tuple[float, ...]:
    windows = min(CURVE_POINTS, len(values))
    bounds = [round(i * len(values) / windows) for i in range(windows + 1)]
    return tuple(sum(values[a:b]) / (b - a) for a, b in pairwise(bounds))


def recover(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    config: RecoveryConfig,
    *,
    progress: bool = True,
) -> RecoveryReport:
    """Train ``config.learn`` of ``student`` (fake-quant, in place) to match ``teacher`` (its float model).

    Each step feeds the same augmented views to both models and minimises ``config.loss`` on their
    features (block outputs, pre-logits embedding, logits: what the student's folds and rotations
    leave equal to the teacher's). The student keeps its bit plan and grids; what it learns is
    written into its own parameters and quantizer buffers (see ``lrpq.recovery.learnable``).
    """
    if images.ndim != 4 or len(images) < 2:
        raise RecoveryError("recovery needs the calibration images as an (N, C, H, W) tensor of at least 2 images")
    started = time.perf_counter()
    student.eval()
    teacher.eval()  # only ever run under no_grad
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(len(images), min(config.batch_size, len(images)), generator)
    values: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the losses' connectors, CRD's memory and QDrop's draws
        with torch.no_grad():
            probe = extract_features(teacher, images[:2], attention=False)
        objective = build_loss(config.loss, FeatureShapes.of(probe, num_images=len(images))).to(images.device)
        with learnable(student, config.learn, config.drop) as trainable:
            optimisers = _optimisers(trainable, objective, config)
            factor = partial(learning_rate_factor, steps=config.steps)
            schedules = [torch.optim.lr_scheduler.LambdaLR(optimiser, factor) for optimiser in optimisers]
            for step in tqdm(range(config.steps), desc="recovery", disable=not progress, leave=False):
                index = next(batches)
                views = augment(images[index], generator) if config.augment else images[index]
                with torch.no_grad():
                    target = extract_features(teacher, views, index=index, attention=False)
                value = objective(extract_features(student, views, index=index, attention=False), target)
                if not torch.isfinite(value):
                    raise RecoveryError(f"the recovery loss {config.loss!r} became {value.item()} at step {step}")
                for optimiser in optimisers:
                    optimiser.zero_grad(set_to_none=True)
                value.backward()
                for optimiser, schedule in zip(optimisers, schedules, strict=True):
                    optimiser.step()
                    schedule.step()
                values.append(value.item())
            learned = trainable.counts()
    return RecoveryReport(
        loss=config.loss,
        steps=config.steps,
        seconds=round(time.perf_counter() - started, 2),
        curve=_curve(values),
        learned=learned,
        changed_levels=trainable.changed_levels,
    )
