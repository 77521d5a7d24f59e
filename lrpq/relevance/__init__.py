"""Layer-wise relevance propagation on unmodified timm ViT, DeiT and Swin models (LRP-QViT, Sec. 3).

LRP-QViT gives more bits to the layers that carry more of the evidence for the predicted class.
That evidence is measured with Chefer et al.'s relevance rules (CVPR 2021): z⁺ through Linear and
Conv layers, identity through GELU/softmax/LayerNorm/dropout/LayerScale, a gradient×input split of
q·kᵀ and attn·v and of residual adds, renormalised so each pair conserves relevance, and sums where
a tensor fans out. A layer's contribution for one image is LRP-QViT's ``mean((∇A ⊙ R)⁺)`` over its
output ``A`` (``layer_contribution``), where ``∇A`` is the target logit's gradient from the same pass
and ``R`` the relevance there: the positive part of the product, so an element whose gradient and
relevance are both negative counts too. The q·kᵀ layer is scored on the post-softmax attention, its
``(∇A ⊙ R)⁺`` averaged over heads being Chefer's attention map; a layer's score is the mean
contribution over images, normalised within its block by the allocators.

- ``rules``: the elementary rules on plain tensors and ``layer_contribution``;
- ``propagation``: the recorded forward pass and the backward pass, one rule per timm module type;
- ``explanation``: ``explain`` (one batch) and ``relevance_map`` (one image, in pixels);
- ``layer_scores``: contributions over many images, ``LayerScores`` and their files;
- ``report``: the relevance report folder (scores, chart, heat maps), imported on its own since it
  pulls in matplotlib.
"""

from lrpq.relevance.explanation import MAP_METHODS, Explanation, block_of_layers, explain, relevance_map
from lrpq.relevance.layer_scores import (
    Contributions,
    LayerScores,
    collect_contributions,
    compute_layer_scores,
    ranking_stability,
)
from lrpq.relevance.propagation import Propagation, RelevanceError, RelevanceTrace, check_supported, relevance_trace
from lrpq.relevance.rules import (
    EPSILON,
    add_relevance,
    clone_relevance,
    layer_contribution,
    matmul_relevance,
    safe_divide,
    zplus_linear,
    zplus_relevance,
)

__all__ = [
    "EPSILON",
    "MAP_METHODS",
    "Contributions",
    "Explanation",
    "LayerScores",
    "Propagation",
    "RelevanceError",
    "RelevanceTrace",
    "add_relevance",
    "block_of_layers",
    "check_supported",
    "clone_relevance",
    "collect_contributions",
    "compute_layer_scores",
    "explain",
    "layer_contribution",
    "matmul_relevance",
    "ranking_stability",
    "relevance_map",
    "relevance_trace",
    "safe_divide",
    "zplus_linear",
    "zplus_relevance",
]
