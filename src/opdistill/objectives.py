"""From a config to per-token losses: every objective in one registry, behind one call.

Each `loss.kind` is an `Objective` in `OBJECTIVES`: its per-token loss and what it needs from the
step (the cheapest teacher answer, whether top-k log-probs serve it, whether it learns only from
the student's own samples, whether it reads the sampler's log-probs). Adding an objective means
one `register(Objective(...))` here and its name in `config.LossKind`.

`per_token_loss` returns the loss of each response token and `token_weights` the weight each token
gets in the mean (the response mask, times TIP selection and position weights when configured).
The trainer reduces them with `reduce_weighted`. The formulas live in `opdistill.losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from opdistill.batch import Batch
from opdistill.config import Config, LossConfig
from opdistill.errors import OpdistillError
from opdistill.losses import (
    DIVERGENCE_KINDS,
    chunked_token_divergence,
    group_advantages,
    minillm_loss,
    policy_gradient_loss,
    position_weights,
    reduce_loss,
    reward_mixed_loss,
    sampled_token_loss,
    sequence_mean,
    taid_loss,
    tip_weights,
    token_divergence,
    token_logprobs,
    token_nll,
    topk_divergence,
    uld_distance,
    vopd_loss,
    weighted_token_mean,
)
from opdistill.losses.projected import ProjectedLogits, projected_token_loss
from opdistill.losses.self_distill import base_anchor
from opdistill.teachers import Answer, TopKLogprobs

TeacherScores = Tensor | TopKLogprobs | ProjectedLogits | None
# `loss.output_chunking: auto` forms the logits per chunk above this many per step (64 MiB fp32).
AUTO_CHUNKING_ELEMENTS = 1 << 24


@dataclass
class StepInputs:
    """What a step knows besides logits: TAID's t and, with a reward, per-sequence advantages."""

    taid_t: float = 1.0
    advantages: Tensor | None = None


@dataclass
class LossInputs:
    """Everything an objective's per-token loss reads."""

    loss: LossConfig
    student_logits: Tensor | ProjectedLogits  # [B, R, V], or formed per chunk (divergences)
    teacher: TeacherScores  # full logits [B, R, V], TopKLogprobs (top-k or tokens), projected
    batch: Batch
    taid_t: float = 1.0


@dataclass(frozen=True)
class Objective:
    """One `loss.kind`.

    teacher: the cheapest teacher answer the loss reads (None: no teacher).
    sparse: top-k log-probs plus a tail bucket serve it too (`loss.teacher_top_k` > 0).
    on_policy_only: it learns from the student's own samples (needs λ = 1).
    sampler_logprobs: it reads the log-probs recorded when the tokens were sampled.
    check: further config checks, raising `OpdistillError`.
    """

    name: str
    loss: Callable[[LossInputs], Tensor]
    teacher: Answer | None = "logits"
    sparse: bool = False
    on_policy_only: bool = False
    sampler_logprobs: bool = False
    check: Callable[[Config], None] | None = None


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is registered twice")
    OBJECTIVES[objective.name] = objective
    return objective


def objective_for(config: Config) -> Objective:
    return OBJECTIVES[config.loss.kind]


# ------------------------------------------------------------------------------ the objectives
def _nll(x: LossInputs) -> Tensor:
    return token_nll(x.student_logits, x.batch.response_ids, temperature=x.loss.temperature)


def _divergence(x: LossInputs) -> Tensor:
    lc = x.loss
    if isinstance(x.student_logits, ProjectedLogits):  # formed one chunk of positions at a time
        return _projected_divergence(x)
    if isinstance(x.teacher, TopKLogprobs):
        return topk_divergence(
            x.student_logits,
            x.teacher.indices,
            x.teacher.logprobs,
            lc.kind,
            beta=lc.beta,
            alpha=lc.alpha,
            temperature=lc.temperature,
        )
    return chunked_token_divergence(
        x.student_logits,
        x.teacher,
        lc.kind,
        beta=lc.beta,
        alpha=lc.alpha,
        temperature=lc.temperature,
        chunk_size=lc.chunk_size,
    )


def _projected_divergence(x: LossInputs) -> Tensor:
    lc = x.loss
    options = dict(beta=lc.beta, alpha=lc.alpha, temperature=lc.temperature)
    if isinstance(x.teacher, TopKLogprobs):

        def sparse(logits: Tensor, top: tuple[Tensor, Tensor]) -> Tensor:
            return topk_divergence(logits, top[0], top[1], lc.kind, **options)

        teacher = (x.teacher.indices, x.teacher.logprobs)
        return projected_token_loss(x.student_logits, teacher, sparse, lc.chunk_size)

    def full(logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return token_divergence(logits, teacher_logits, lc.kind, **options)

    return projected_token_loss(x.student_logits, x.teacher, full, lc.chunk_size)


def chunks_output(config: Config, num_positions: int, vocab_size: int) -> bool:
    """Whether a step's student logits are formed per chunk from hidden states (see
    `loss.output_chunking`): token divergences only, without TIP (it reads the full
    distributions) or a reward (its policy gradient reads the logits)."""
    lc = config.loss
    mode = lc.output_chunking
    eligible = (
        lc.kind in DIVERGENCE_KINDS and lc.tip.mode == "off" and config.reward.distill_weight == 1
    )
    if mode == "off" or not eligible:
        return False
    return mode == "on" or num_positions * vocab_size > AUTO_CHUNKING_ELEMENTS


def _check_jsd(config: Config) -> None:
    beta = config.loss.beta
    if not 0.0 < beta < 1.0:
        raise OpdistillError(
            f"loss.beta={beta}: jsd needs beta in (0, 1); at 0 or 1 it is identically 0 "
            "(use kind forward_kl or reverse_kl instead)"
        )


def _check_skew(config: Config) -> None:
    alpha = config.loss.alpha
    if not 0.0 <= alpha < 1.0:
        raise OpdistillError(f"loss.alpha={alpha}: skew divergences need alpha in [0, 1)")


def _teacher_token_logprobs(x: LossInputs) -> Tensor:
    """The teacher's log-prob of each response token at τ (a sparse answer already is at τ)."""
    if isinstance(x.teacher, TopKLogprobs):
        return x.teacher.token_logprobs
    return token_logprobs(x.teacher, x.batch.response_ids, temperature=x.loss.temperature)


def _sampled_token(x: LossInputs) -> Tensor:
    student_lp = token_logprobs(
        x.student_logits, x.batch.response_ids, temperature=x.loss.temperature
    )
    sampler_lp = x.batch.sampler_logprobs
    sampler_lp = student_lp.detach() if sampler_lp is None else sampler_lp
    return sampled_token_loss(
        student_lp,
        _teacher_token_logprobs(x),
        sampler_lp,
        x.batch.response_mask,
        gamma=x.loss.gamma,
        is_cap=x.loss.is_cap,
    )


def _vopd(x: LossInputs) -> Tensor:
    lc = x.loss
    return vopd_loss(
        x.student_logits,
        x.teacher,
        x.batch.response_ids,
        x.batch.response_mask,
        top_k=lc.top_k,
        gamma=lc.gamma,
        temperature=lc.temperature,
    )


def _minillm(x: LossInputs) -> Tensor:
    """MiniLLM with the importance ratio ρ_t = q_θ(y_t) / p_s(y_t) against the distribution the
    tokens were drawn from, recorded at sampling time (p_s: the teacher–student mixture p̃ at
    `train.temperature`, or the student that sampled them). Without a clip ρ weights the policy
    gradient (MiniLLM's Q/p̃ weight); with `clip` = ε it is clipped PPO-style to [1−ε, 1+ε]."""
    lc, batch = x.loss, x.batch
    student_lp = token_logprobs(x.student_logits, batch.response_ids, temperature=lc.temperature)
    sampler_lp = batch.sampler_logprobs
    sampler_lp = student_lp.detach() if sampler_lp is None else sampler_lp
    clip = lc.minillm.clip
    return minillm_loss(
        x.student_logits,
        x.teacher,
        batch.response_ids,
        batch.response_mask,
        length_norm=lc.minillm.length_norm,
        importance_weights=None if clip > 0 else (student_lp.detach() - sampler_lp).exp(),
        old_logprobs=sampler_lp if clip > 0 else None,
        clip=clip,
        temperature=lc.temperature,
    )


def _check_minillm(config: Config) -> None:
    """Refuse a clip that can never act: fresh samples of the student itself, scored before the
    weights change and at the sampling temperature, have ratio 1 exactly."""
    mm, train = config.loss.minillm, config.train
    if (
        mm.clip > 0
        and mm.teacher_mix == 0
        and not train.adaptive_source.enabled
        and train.temperature == config.loss.temperature
    ):
        raise OpdistillError(
            f"loss.minillm.clip={mm.clip} has no effect with loss.minillm.teacher_mix=0: every "
            "token is scored by the student that just sampled it (ratio 1); set teacher_mix > 0 "
            "(the ratio is then taken against the mixture), enable train.adaptive_source "
            "(replayed samples), or set clip: 0"
        )


def _taid(x: LossInputs) -> Tensor:
    return taid_loss(x.student_logits, x.teacher, x.taid_t, temperature=x.loss.temperature)


register(Objective("nll", _nll, teacher=None))
for _kind in DIVERGENCE_KINDS:
    register(
        Objective(
            _kind,
            _divergence,
            sparse=True,
            check={
                "jsd": _check_jsd,
                "skew_forward_kl": _check_skew,
                "skew_reverse_kl": _check_skew,
            }.get(_kind),
        )
    )
register(
    Objective(
        "sampled_token",
        _sampled_token,
        teacher="token_logprobs",
        sparse=True,
        on_policy_only=True,
        sampler_logprobs=True,
    )
)
register(Objective("vopd", _vopd, on_policy_only=True))
register(
    Objective("minillm", _minillm, on_policy_only=True, sampler_logprobs=True, check=_check_minillm)
)
register(Objective("taid", _taid))


def teacher_answer(config: Config) -> Answer | None:
    """The cheapest answer the run's steps need from the teacher (None: it is not asked).

    Full logits where TIP reads the teacher's distribution; otherwise the response tokens'
    log-probs when that is all the objective reads (`sampled_token`, even with
    `loss.teacher_top_k` > 0), top-k log-probs when `loss.teacher_top_k` > 0, and else the
    objective's own need.
    """
    distills = config.loss.kind != "nll" and config.reward.distill_weight > 0
    if not distills and config.loss.tip.mode == "off":
        return None
    objective = objective_for(config)
    if config.loss.tip.mode != "off" or objective.teacher is None:
        return "logits"
    if objective.teacher == "token_logprobs":
        return "token_logprobs"
    if config.loss.teacher_top_k > 0:
        return "topk"
    return objective.teacher


def distillation_loss(
    config: Config,
    student_logits: Tensor,
    teacher_logits: TeacherScores,
    batch: Batch,
    t: float,
) -> Tensor:
    """The configured distillation objective per response token, [B, T].

    The teacher's scores are its full logits [B, T, V], or its top-k log-probs (`TopKLogprobs`,
    `loss.teacher_top_k` > 0, or only the response tokens' for `sampled_token`).
    """
    objective = objective_for(config)
    needs_logits = objective.teacher is not None and not objective.sparse
    if isinstance(teacher_logits, TopKLogprobs) and needs_logits:
        sparse = ", ".join(name for name, o in OBJECTIVES.items() if o.sparse)
        raise OpdistillError(
            f"loss.kind={objective.name!r} needs the teacher's full logits; top-k teacher "
            f"log-probs (loss.teacher_top_k > 0) serve {sparse}"
        )
    if config.loss.cross_tokenizer == "uld":  # teacher logits over its own vocabulary
        return uld_distance(student_logits, teacher_logits, config.loss.temperature)
    return objective.loss(LossInputs(config.loss, student_logits, teacher_logits, batch, t))


def per_token_loss(
    config: Config,
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogprobs | None,
    batch: Batch,
    inputs: StepInputs,
) -> Tensor:
    """Distillation loss, mixed with the verifier reward's policy gradient when configured."""
    weight = config.reward.distill_weight
    if inputs.advantages is None or weight == 1.0:
        return distillation_loss(config, student_logits, teacher_logits, batch, inputs.taid_t)
    student_lp = token_logprobs(student_logits, batch.response_ids)
    pg = policy_gradient_loss(student_lp, inputs.advantages, batch.response_mask)
    if weight == 0.0:
        return pg
    distill = distillation_loss(config, student_logits, teacher_logits, batch, inputs.taid_t)
    return reward_mixed_loss(distill, pg, weight)


def anchor_loss(
    config: Config, student_logits: Tensor | ProjectedLogits, base_logits: Tensor
) -> Tensor:
    """w·D(π_base‖q_θ) per token (`self_distill.anchor_weight`, `anchor_kind`), [B, R]."""
    sd, temperature = config.self_distill, config.loss.temperature

    def anchor(student: Tensor, base: Tensor) -> Tensor:
        return base_anchor(student, base, sd.anchor_weight, sd.anchor_kind, temperature)

    if isinstance(student_logits, ProjectedLogits):
        return projected_token_loss(student_logits, base_logits, anchor, config.loss.chunk_size)
    return anchor(student_logits, base_logits)


def uses_token_weights(config: Config) -> bool:
    """Whether TIP selection or position weights change the per-token weights."""
    return config.loss.tip.mode != "off" or config.loss.position_weights.enabled


def token_weights(
    config: Config,
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogprobs | None,
    mask: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-token weights: the mask, times TIP's keep-mask and PW-OPSD's position weights."""
    tip, pw = config.loss.tip, config.loss.position_weights
    weights = mask.float()
    if tip.mode != "off":
        if isinstance(teacher_logits, TopKLogprobs):
            raise OpdistillError(
                "loss.tip needs the teacher's full logits: set loss.teacher_top_k=0 or "
                "loss.tip.mode=off"
            )
        with torch.no_grad():
            weights = weights * tip_weights(
                student_logits.detach(),
                teacher_logits,
                mask,
                keep_fraction=tip.keep_fraction,
                mode=tip.mode,
                entropy_power=tip.entropy_power,
                divergence_power=tip.divergence_power,
                entropy_threshold=tip.entropy_threshold,
                divergence_threshold=tip.divergence_threshold,
                generator=generator,
            )
    if pw.enabled:
        weights = weights * position_weights(mask, w_min=pw.w_min, tau=pw.tau, s=pw.s)
    return weights


def reduce_weighted(
    config: Config,
    per_token: Tensor,
    weights: Tensor | None,
    mask: Tensor,
    num_tokens: int,
    num_sequences: int,
) -> Tensor:
    """This micro-batch's share of the step loss.

    Without token weights: the configured reduction with global token / sequence counts, exact
    under gradient accumulation and across processes. With weights (TIP, position weights):
    `loss.reduction: token` gives the weighted mean Σ w·ℓ / Σ w over the micro-batch, scaled by
    its share of the step's tokens (exact for one micro-batch; a token-weighted average of
    micro-batch means otherwise); `loss.reduction: sequence` gives each sequence's weighted mean
    Σ_t w·ℓ / Σ_t w (0 for a sequence whose tokens all have weight 0), averaged over the step's
    sequences (exact under accumulation and across processes).
    """
    if weights is None:
        return reduce_loss(
            per_token,
            mask,
            config.loss.reduction,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )
    if config.loss.reduction == "sequence":
        return sequence_mean(per_token, weights, num_sequences)
    share = float(mask.sum()) / max(1, num_tokens)
    return weighted_token_mean(per_token, weights) * share


def step_loss(
    config: Config,
    student_logits: Tensor | ProjectedLogits,
    teacher_scores: TeacherScores,
    batch: Batch,
    counts: tuple[int, int],
    *,
    taid_t: float = 1.0,
    rewards: Tensor | None = None,
    generator: torch.Generator | None = None,
    observe: Callable[[Batch, Tensor, Tensor | ProjectedLogits], None] | None = None,
    base_logits: Tensor | None = None,
) -> Tensor:
    """A micro-batch's share of the step loss: the objective per token (mixed with the policy
    gradient of the verifier `rewards`, group-normalised, when configured), plus the anchor to
    `base_logits` (`self_distill.anchor_weight`), weighted by TIP / position weights, reduced
    with the step's global (token, sequence) `counts`. `observe` sees the per-token objective (a
    teacher's per-step statistics)."""
    advantages = None
    if rewards is not None:
        advantages = group_advantages(
            rewards.to(batch.response_ids.device),
            config.reward.group_size,
            normalize_std=config.reward.normalize_std,
        )
    per_token = per_token_loss(
        config, student_logits, teacher_scores, batch, StepInputs(taid_t, advantages)
    )
    if observe is not None and teacher_scores is not None:
        observe(batch, per_token, student_logits)
    if base_logits is not None:
        per_token = per_token + anchor_loss(config, student_logits, base_logits)
    weights = None
    if uses_token_weights(config):  # TIP selection, position weights
        weights = token_weights(
            config, student_logits, teacher_scores, batch.response_mask, generator
        )
    return reduce_weighted(config, per_token, weights, batch.response_mask, *counts)
