"""The block-by-block alternative to ``lrpq.recovery``'s end-to-end distillation, kept to measure the choice.

BRECQ/QDrop-style: each ViT block in turn learns the same things as end-to-end recovery
(``lrpq.recovery.learnable``) from the squared error of its output against the float block's, on a fixed
pool of augmented calibration views; its input mixes element by element the float and the quantized
(already recovered) upstream activations (QDrop, drop probability ``--drop``). Prints the dev top-1
beside the unrecovered one; compare with the ``mse`` (or, with ``--loss nmse``, ``nmse``) row of
``scripts/recovery_table.py``.

    python scripts/recovery_blockwise.py --model ref-A --bits 3 --draw 0 --steps 100 --learn norms biases
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from measure import REFERENCES, REPO
from recovery_table import ReferenceModel
from torch import nn

from lrpq.distill.token_losses import channel_normalised_mse
from lrpq.evaluate import evaluate
from lrpq.models import build_model
from lrpq.recovery import LEARNABLE, RecoveryConfig, learnable
from lrpq.recovery.augment import augment
from lrpq.recovery.recover import learning_rate_factor, relative_rate


def block_inputs_and_outputs(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every block's input and output on ``images`` (ViT ``model.blocks``)."""
    inputs: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    outputs: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].detach())))
        handles.append(block.register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(out.detach())))
    with torch.no_grad():
        for chunk in images.split(32):
            model(chunk)
    for handle in handles:
        handle.remove()
    return [torch.cat(x) for x in inputs], [torch.cat(x) for x in outputs]


BLOCK_LOSSES = {"mse": F.mse_loss, "nmse": channel_normalised_mse}  # each block's objective, by --loss


def trainable(block: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in block.named_parameters() if p.requires_grad]


def rate(name: str, parameter: nn.Parameter, config: RecoveryConfig) -> float:
    """The learning rate ``lrpq.recovery.recover`` gives this parameter."""
    kind = name.rsplit(".", 1)[-1]
    if kind == "v":
        return config.lr_rounding
    if kind == "log_ratio":
        return config.lr_scales
    return relative_rate(parameter, config.lr_floats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCES), required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--plan", choices=("fixed", "mixed"), default="fixed")
    parser.add_argument("--draw", type=int, default=0)
    parser.add_argument("--steps", type=int, default=RecoveryConfig.steps, help="steps per block")
    parser.add_argument("--views", type=int, default=4, help="views per calibration image (the first unaugmented)")
    parser.add_argument("--drop", type=float, default=0.5, help="QDrop: share of inputs taken from the float model")
    parser.add_argument("--learn", nargs="+", choices=LEARNABLE, default=list(RecoveryConfig.learn))
    parser.add_argument("--loss", choices=sorted(BLOCK_LOSSES), default="mse", help="each block's objective")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "recovery-table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = ReferenceModel(args.model, REFERENCES[args.model], args.cache, None)
    model, teacher = ref.quantized(args.bits, args.plan, args.draw), build_model(ref.spec)
    before = evaluate(model, ref.dev(), progress=False).top1
    config = RecoveryConfig(learn=tuple(args.learn), seed=args.draw)
    generator = torch.Generator().manual_seed(config.seed)
    calib = ref.calib(args.draw)
    images = torch.cat([calib] + [augment(calib, generator) for _ in range(args.views - 1)])
    started = time.perf_counter()
    float_inputs, float_outputs = block_inputs_and_outputs(teacher, images)
    with learnable(model, config.learn):
        quantized_input = block_inputs_and_outputs(model, images)[0][0]
        for block, float_input, float_output in zip(model.blocks, float_inputs, float_outputs, strict=True):
            optimiser = torch.optim.Adam([{"params": [p], "lr": rate(name, p, config)} for name, p in trainable(block)])
            schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: learning_rate_factor(step, args.steps))
            for _ in range(args.steps):
                index = torch.randint(len(images), (config.batch_size,), generator=generator)
                mixed = torch.rand(quantized_input[index].shape, generator=generator) < args.drop
                output = block(torch.where(mixed, float_input[index], quantized_input[index]))
                loss = BLOCK_LOSSES[args.loss](output, float_output[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
            with torch.no_grad():
                quantized_input = torch.cat([block(chunk) for chunk in quantized_input.split(32)])
    seconds = time.perf_counter() - started
    after = evaluate(model, ref.dev(), progress=False).top1
    print(json.dumps({**vars(args), "cache": str(args.cache), "before": before, "after": after, "seconds": seconds}))


if __name__ == "__main__":
    main()
