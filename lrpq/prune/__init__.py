"""Structured post-training pruning of ViT/DeiT/Swin blocks: whole attention heads and MLP hidden channels.

``structure`` says what a pruned model keeps and cuts a timm model to it; ``criteria``,
``lrp_scores`` and ``reconstruction`` score the units; ``selection`` turns scores into a structure;
``recovery`` refits the layers that read the pruned units; ``pipeline`` runs the whole thing and
``run_dir`` writes the loadable result. Importing this package imports nothing heavy, so
``lrpq.models`` can rebuild pruned cards from ``structure`` alone.
"""
