"""Losses on the classifier output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrpq.distill.features import DistillFeatures


class KDLoss(nn.Module):
    """Hinton et al. 2015: L = T² · (1/B) Σ_b KL(softmax(z_t,b / T) ‖ softmax(z_s,b / T)).

    T = 4 is RepDistiller's ``--kd_T``; the T² factor keeps the gradient scale independent of T.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(student.logits / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher.logits.detach() / t, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * t * t
