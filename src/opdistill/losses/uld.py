"""Universal Logit Distillation (Boizard et al. 2024): a divergence across vocabularies.

With teacher and student over different vocabularies, ULD compares the two distributions as sorted
probability vectors, p↓ and q↓ (the smaller vocabulary padded with zeros to the larger size):

    ULD(p, q) = Σ_i |p↓_i − q↓_i|

the closed form of the Wasserstein-1 distance the paper derives when the cost of moving mass
between two tokens does not depend on which tokens they are. It is 0 iff the distributions are
equal up to a relabelling of tokens, invariant to any permutation of either vocabulary, and in
[0, 2]. Gradients flow to the student through the sort (a permutation).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from opdistill.losses.logprobs import log_softmax_at


def sorted_probabilities(logits: Tensor, temperature: float = 1.0, width: int = 0) -> Tensor:
    """softmax(logits / τ) sorted in decreasing order, zero-padded on the right to `width`."""
    probs = log_softmax_at(logits, temperature).exp().sort(dim=-1, descending=True).values
    return F.pad(probs, (0, max(0, width - probs.shape[-1])))


def uld_distance(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Per-position ULD [..., ] between student logits [..., V_S] and teacher logits [..., V_T]
    (any two vocabulary sizes), both at temperature τ."""
    width = max(student_logits.shape[-1], teacher_logits.shape[-1])
    q = sorted_probabilities(student_logits, temperature, width)
    p = sorted_probabilities(teacher_logits.detach(), temperature, width)
    return (q - p.to(q.device)).abs().sum(dim=-1)
