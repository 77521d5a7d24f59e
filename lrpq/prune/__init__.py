"""Structured post-training pruning of ViT/DeiT/Swin blocks: whole attention heads and MLP hidden channels.

``structure`` says what a pruned model keeps and cuts a timm model to it; ``criteria`` (with
``lrp_scores`` and ``reconstruction``) scores the units; ``selection`` turns scores into a structure;
``recovery`` refits the layers that read the pruned units; ``unstructured`` is the magnitude
baseline; ``cost`` counts parameters and FLOPs; ``pipeline`` runs the whole thing, ``run_dir``
writes the loadable result and ``cli`` is ``lrpq prune``. Importing this package imports nothing
heavy, so ``lrpq.models`` can rebuild pruned cards from ``structure`` alone.
"""
