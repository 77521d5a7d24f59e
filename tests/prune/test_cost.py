"""Parameter and FLOP (multiply-accumulate) counts on a model small enough to count by hand."""

from __future__ import annotations

import copy

import timm

from lrpq.prune.cost import model_cost
from lrpq.prune.structure import BlockKeep, PrunedStructure, apply_structure, unpruned

# 32 px, patch 8: 16 patches + the class token; 2 blocks of width 48, 2 heads of 24, hidden 192, 5 classes
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_classes": 5}
TOKENS, DIM, HIDDEN = 17, 48, 192


def block_macs(heads: int, hidden: int) -> int:
    attn_dim = heads * 24
    linears = TOKENS * (DIM * 3 * attn_dim + attn_dim * DIM + DIM * hidden + hidden * DIM)
    return linears + 2 * TOKENS * TOKENS * attn_dim  # q·kᵀ and attn·v


def test_counts_of_a_hand_sized_vit_before_and_after_pruning() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS)
    patch_embedding = (DIM * 4 * 4) * 3 * 8 * 8  # output positions × input channels × kernel
    head = DIM * 5  # the class token only
    before = model_cost(model, (3, 32, 32))
    assert before.flops == patch_embedding + 2 * block_macs(2, HIDDEN) + head
    assert before.params == sum(p.numel() for p in model.parameters())

    structure = dict(unpruned(model).blocks)
    structure["blocks.0"] = BlockKeep(2, HIDDEN, [1], list(range(0, HIDDEN, 2)))
    pruned = apply_structure(copy.deepcopy(model), PrunedStructure(structure))
    after = model_cost(pruned, (3, 32, 32))
    assert after.flops == patch_embedding + block_macs(1, HIDDEN // 2) + block_macs(2, HIDDEN) + head
    removed = 3 * 24 * (DIM + 1) + 24 * DIM + (HIDDEN // 2) * (DIM + 1) + (HIDDEN // 2) * DIM  # qkv, proj, fc1, fc2
    assert after.params == before.params - removed
    assert model_cost(model, (3, 32, 32)) == before  # counting leaves the model as it was


def test_swin_counts_every_window() -> None:
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=24,
        depths=(1,),
        num_heads=(2,),
        window_size=7,
        num_classes=5,
    )
    tokens, dim = 14 * 14, 24
    patch_embedding = tokens * dim * 3 * 4 * 4
    block = tokens * (dim * 3 * dim + dim * dim + 2 * dim * 4 * dim) + 2 * 4 * 49 * 49 * dim  # 4 windows of 49
    assert model_cost(model, (3, 56, 56)).flops == patch_embedding + block + dim * 5
