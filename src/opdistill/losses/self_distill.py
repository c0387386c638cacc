"""Terms for self-distillation that keeps diversity (derivations: docs/self-distillation.md).

Self-distillation from a teacher that reads a demonstration c has the optimum

    q*(y|x) ∝ π(y|x) · exp(E_c[PCMI(y; c)]),   PCMI(y; c) = log π(y|x,c) − log π(y|x),

which raises the modes that demonstrations show most often. The two terms here change that tilt:

- `tilted_teacher_logprobs` scales it by a strength α (the tilt becomes α·E_c[PCMI]): α < 1
  tempers it, α > 1 sharpens the separation of correct from incorrect answers when the
  demonstrations are balanced over modes;
- `base_anchor` adds a divergence to the base distribution π(·|x) to every token's loss; with
  forward KL it is mass-covering, so no answer the base model gives keeps vanishing mass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opdistill.losses.divergence import token_divergence
from opdistill.losses.logprobs import log_softmax_at


def tilted_teacher_logprobs(
    context_logits: Tensor, plain_logits: Tensor, strength: float
) -> Tensor:
    """The teacher with its PCMI tilt scaled by α = `strength`, as log-probs [..., V]:

        log T_α(v) = log π(v|x,y<t) + α·[log π(v|x,c,y<t) − log π(v|x,y<t)] − log Z_t

    where π(·|x,c,·) is the network reading the context (`context_logits`), π(·|x,·) the same
    network on the plain prompt (`plain_logits`), and Z_t normalises over the vocabulary. α = 1
    is the context teacher, α = 0 the plain network; between them the two are mixed
    geometrically. A token impossible under either stays impossible (−inf), whatever α.
    """
    log_context = log_softmax_at(context_logits)
    log_plain = log_softmax_at(plain_logits, 1.0, log_context.dtype)
    tilted = log_plain + strength * (log_context - log_plain)
    impossible = torch.isinf(log_context) | torch.isinf(log_plain)
    tilted = tilted.masked_fill(impossible, float("-inf"))
    return torch.log_softmax(tilted, dim=-1)


def base_anchor(
    student_logits: Tensor,
    base_logits: Tensor,
    weight: float,
    kind: str = "forward_kl",
    temperature: float = 1.0,
) -> Tensor:
    """The anchor to the base distribution, per position: w·D(π_base, q_θ).

    With `kind="forward_kl"` it is w·KL(π_base‖q_θ) = w·Σ_v π_base(v)·(log π_base(v) − log q_θ(v)):
    its gradient −w·π_base(v)/q_θ(v) grows without bound as the student drops a token the base
    model gives, so every answer of the base model keeps mass. With `kind="reverse_kl"`,
    w·KL(q_θ‖π_base), the sequence-level optimum is the tempered tilt of `tilted_teacher_logprobs`
    with α = 1/(1 + w). Any token divergence kind of `token_divergence` is accepted, with the
    base distribution in the teacher's place.
    """
    return weight * token_divergence(student_logits, base_logits, kind, temperature=temperature)
