"""Every objective as a configuration of the one loop: a few real steps each."""

import math

import pytest
import torch

from opdistill.batch import Batch
from opdistill.config import (
    AdaptiveSourceConfig,
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    MiniLLMConfig,
    ModelConfig,
    PositionWeightsConfig,
    RewardConfig,
    TIPConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from opdistill.errors import OpdistillError
from opdistill.losses import DIVERGENCE_KINDS, token_divergence
from opdistill.models.loading import tiny_llama
from opdistill.objectives import distillation_loss
from opdistill.replay import ReplayBuffer
from opdistill.rollout import HFGenerateRollout
from opdistill.teachers.base import TopKLogprobs, topk_from_logits
from opdistill.trainer import Trainer

CASES = {
    "sampled_token": dict(loss=LossConfig(kind="sampled_token", gamma=0.5)),
    "vopd": dict(loss=LossConfig(kind="vopd")),
    "vopd_top_k": dict(loss=LossConfig(kind="vopd", top_k=4)),
    "minillm": dict(
        loss=LossConfig(kind="minillm", minillm=MiniLLMConfig(teacher_mix=0.2, clip=0.2))
    ),
    "minillm_student_only": dict(
        loss=LossConfig(kind="minillm", minillm=MiniLLMConfig(teacher_mix=0.0))
    ),
    "taid": dict(loss=LossConfig(kind="taid")),
    "skew_forward_kl": dict(loss=LossConfig(kind="skew_forward_kl", alpha=0.1)),
    "skew_reverse_kl": dict(loss=LossConfig(kind="skew_reverse_kl", alpha=0.1)),
    "tvd": dict(loss=LossConfig(kind="tvd")),
    "tip_weighted": dict(loss=LossConfig(kind="reverse_kl", tip=TIPConfig(mode="weighted"))),
    "tip_quadrant": dict(  # thresholds that select tokens of an untrained pair
        loss=LossConfig(
            kind="jsd",
            beta=0.9,
            tip=TIPConfig(mode="quadrant", entropy_threshold=1.0, divergence_threshold=0.0),
        )
    ),
    "position_weights": dict(
        loss=LossConfig(kind="vopd", position_weights=PositionWeightsConfig(enabled=True))
    ),
    "gkd_reward": dict(
        loss=LossConfig(kind="reverse_kl"), reward=RewardConfig(distill_weight=0.5, group_size=2)
    ),
    "grpo": dict(
        loss=LossConfig(kind="nll"), reward=RewardConfig(distill_weight=0.0, group_size=4)
    ),
    "sequence_reduction": dict(loss=LossConfig(kind="forward_kl", reduction="sequence")),
    "sequence_reduction_tip": dict(
        loss=LossConfig(kind="reverse_kl", reduction="sequence", tip=TIPConfig(mode="weighted"))
    ),
}


def config_for(tmp_path, case: str, **train) -> Config:
    values = dict(
        steps=3,
        batch_size=4,
        lr=1e-2,
        max_new_tokens=5,
        log_every=1,
        output_dir=str(tmp_path / case),
        progress=False,
    )
    values.update(train)
    config = Config(
        model=ModelConfig(student="mem", teacher="mem"),
        data=DataConfig(task="graph"),
        train=TrainConfig(**values),
        eval=EvalConfig(num_prompts=4, num_samples=2, ks=[1, 2], max_new_tokens=5),
        **CASES.get(case, {}),
    )
    return config_from_dict(config_to_dict(config))  # through validation, as from YAML


def make_trainer(config, tokenizer, task, teacher=True):
    teacher_model = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    return Trainer(
        config,
        student,
        tokenizer,
        task,
        task.examples("train", 64),
        task.examples("eval", 4),
        teacher_model=teacher_model if teacher else None,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_objective_trains(tmp_path, tokenizer, graph_task, case, monkeypatch):
    # An untrained student fails every prompt, so every reward is 0 and every advantage 0; this
    # stand-in verifier accepts responses of even length, so rewards within a group differ.
    monkeypatch.setattr(graph_task, "is_correct", lambda example, text: len(text) % 2 == 0)
    config = config_for(tmp_path, case)
    trainer = make_trainer(config, tokenizer, graph_task, teacher=config.reward.distill_weight > 0)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    stats = [trainer.step() for _ in range(3)]
    assert all(math.isfinite(s.loss) for s in stats)
    assert any(s.grad_norm > 0 for s in stats)
    moved = any(
        not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters(), strict=True)
    )
    assert moved
    if config.reward.distill_weight < 1:
        assert all(s.reward is not None and 0 <= s.reward <= 1 for s in stats)


def test_taid_interpolation_rises_and_resumes(tmp_path, tokenizer, graph_task):
    config = config_for(tmp_path, "taid", steps=4, save_every=2)
    trainer = make_trainer(config, tokenizer, graph_task)
    values = []
    for _ in range(4):
        trainer.step()
        values.append(trainer.taid.t)
        if trainer.step_count == 2:
            trainer.save_checkpoint()
            saved = trainer.taid.state_dict()
    assert values == sorted(values) and values[0] >= 0.4 and values[-1] == pytest.approx(1.0)
    resumed = make_trainer(config, tokenizer, graph_task)
    resumed.load_latest_checkpoint()
    assert resumed.taid.state_dict() == saved


def test_grpo_samples_groups_of_one_prompt(tmp_path, tokenizer, graph_task):
    config = config_for(tmp_path, "grpo")
    trainer = make_trainer(config, tokenizer, graph_task, teacher=False)
    batch = trainer.sources.student_batch()
    prompts = [e.prompt for e in batch.examples]
    assert len(prompts) == 4 and len(set(prompts)) == 1


def test_reward_needs_a_verifier_and_on_policy_data(tmp_path, tokenizer, graph_task):
    with pytest.raises(OpdistillError, match="student_data_fraction=1"):
        config_for(tmp_path, "gkd_reward", student_data_fraction=0.5)
    with pytest.raises(OpdistillError, match=r"multiple of reward\.group_size"):
        config_for(tmp_path, "grpo", batch_size=6)
    with pytest.raises(OpdistillError, match="student_data_fraction=1"):
        config_for(tmp_path, "vopd", student_data_fraction=0.0)


def test_distillm_schedule_raises_phi_when_validation_loss_rises(
    tmp_path, tokenizer, graph_task, monkeypatch
):
    adaptive = AdaptiveSourceConfig(
        enabled=True, increase=0.1, threshold=0.1, replay_size=8, replay_reuse=1.0
    )
    config = config_for(
        tmp_path,
        "skew_forward_kl",
        student_data_fraction=0.0,
        adaptive_source=adaptive,
    )
    trainer = make_trainer(config, tokenizer, graph_task)
    assert trainer.validation_loss() > 0
    losses = iter([1.0, 1.05, 1.3, 1.2, 1.5])
    monkeypatch.setattr(trainer, "validation_loss", lambda: next(losses))
    phis = [trainer.adapt_student_data_fraction()["student_data_fraction"] for _ in range(5)]
    assert phis == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2])


def test_distillm_replay_is_reused(tmp_path, tokenizer, graph_task):
    adaptive = AdaptiveSourceConfig(enabled=True, replay_size=8, replay_reuse=1.0)
    config = config_for(tmp_path, "skew_forward_kl", adaptive_source=adaptive)
    trainer = make_trainer(config, tokenizer, graph_task)
    first = trainer.sources.student_batch()  # buffer empty: sampled fresh, then stored
    assert len(trainer.replay) == 4
    again = trainer.sources.student_batch()  # reuse probability 1: drawn from the buffer
    assert {e.prompt for e in again.examples} <= {e.prompt for e in first.examples}
    assert trainer.step().num_tokens > 0


def test_replay_buffer_round_trip_and_capacity(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    batch = HFGenerateRollout(model, tokenizer).generate(graph_task.examples("eval", 3), 4)
    buffer = ReplayBuffer(capacity=4, pad_id=tokenizer.pad_token_id, seed=0)
    buffer.add(batch)
    buffer.add(batch)
    assert len(buffer) == 4
    replayed = buffer.sample(2)
    for row in range(2):
        prompt = replayed.examples[row].prompt
        original = next(i for i, e in enumerate(batch.examples) if e.prompt == prompt)
        n = int(batch.response_mask[original].sum())
        assert torch.equal(replayed.response_ids[row, :n], batch.response_ids[original, :n])
        assert torch.allclose(
            replayed.sampler_logprobs[row, :n], batch.sampler_logprobs[original, :n]
        )
    clone = ReplayBuffer(capacity=4, pad_id=tokenizer.pad_token_id)
    clone.load_state_dict(buffer.state_dict())
    assert [e.prompt for e in clone.sample(4).examples] == [
        e.prompt for e in buffer.sample(4).examples
    ]


def _scored_batch(vocab: int = 11, seed: int = 0):
    """Random student/teacher logits [2, 4, V] and a batch whose responses they score."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 4, vocab, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 4, vocab, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, vocab, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = Batch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), ids, mask)
    return student, teacher, batch


def _sparse_config(kind: str, **loss) -> Config:
    return Config(
        model=ModelConfig(student="s", teacher="t"),
        loss=LossConfig(kind=kind, temperature=1.5, **loss),
    )


@pytest.mark.parametrize("kind", [*DIVERGENCE_KINDS, "sampled_token"])
def test_top_k_teacher_scores_dispatch(kind):
    student, teacher, batch = _scored_batch()
    config = _sparse_config(kind, teacher_top_k=11, gamma=0.5)
    full = distillation_loss(config, student, teacher, batch, 1.0)
    scores = topk_from_logits(teacher, batch.response_ids, 11, temperature=1.5)
    assert isinstance(scores, TopKLogprobs)
    sparse = distillation_loss(config, student, scores, batch, 1.0)
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)  # TopKLogprobs are fp32
    small = topk_from_logits(teacher, batch.response_ids, 3, temperature=1.5)
    values = distillation_loss(config, student, small, batch, 1.0)
    assert values.shape == (2, 4) and torch.isfinite(values).all()
    if kind == "sampled_token":  # needs only the response tokens' log-probs
        torch.testing.assert_close(values, full, rtol=1e-5, atol=1e-6)


def test_full_teacher_divergences_use_chunked_loss():
    student, teacher, batch = _scored_batch()
    config = _sparse_config("jsd", beta=0.3, chunk_size=3)
    torch.testing.assert_close(
        distillation_loss(config, student, teacher, batch, 1.0),
        token_divergence(student, teacher, "jsd", beta=0.3, temperature=1.5),
    )


@pytest.mark.parametrize("kind", ["vopd", "minillm", "taid"])
def test_top_k_teacher_scores_refuse_objectives_that_need_full_logits(kind):
    student, teacher, batch = _scored_batch()
    scores = topk_from_logits(teacher, batch.response_ids, 4)
    with pytest.raises(OpdistillError, match=rf"loss\.kind='{kind}' needs the teacher's full"):
        distillation_loss(_sparse_config(kind), student, scores, batch, 1.0)


def test_sequence_reduction_with_token_weights_is_a_mean_of_sequence_means():
    """`loss.reduction: sequence` with position weights: each sequence's weighted mean, then the
    mean over the step's sequences (not the token-weighted mean of the whole micro-batch)."""
    from opdistill.losses import position_weights
    from opdistill.objectives import reduce_weighted

    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    pw = PositionWeightsConfig(enabled=True)
    weights = mask.float() * position_weights(mask, w_min=pw.w_min, tau=pw.tau, s=pw.s)
    config = Config(loss=LossConfig(kind="forward_kl", reduction="sequence", position_weights=pw))
    got = reduce_weighted(config, per_token, weights, mask, num_tokens=5, num_sequences=2)
    first = (per_token[0] * weights[0]).sum() / weights[0].sum()
    assert float(got) == pytest.approx(float((first + 10.0) / 2))
    # Two micro-batches of one sequence each add up to the same step loss.
    halves = sum(
        reduce_weighted(config, per_token[i : i + 1], weights[i : i + 1], mask[i : i + 1], 5, 2)
        for i in range(2)
    )
    assert float(halves) == pytest.approx(float(got))
    token = Config(loss=LossConfig(kind="forward_kl", position_weights=pw))
    assert float(reduce_weighted(token, per_token, weights, mask, 5, 2)) != pytest.approx(
        float(got)
    )


def test_validation_loss_uses_the_loss_temperature(tmp_path, tokenizer, graph_task):
    """DistiLLM's schedule compares the trained objective: the divergence at loss.temperature."""
    from opdistill.batch import batch_logits, dataset_batch
    from opdistill.losses import masked_token_sum

    adaptive = AdaptiveSourceConfig(enabled=True, replay_size=8)
    values = {}
    for temperature in (1.0, 2.5):
        config = config_for(tmp_path, "skew_forward_kl", adaptive_source=adaptive)
        config.loss.temperature = temperature
        trainer = make_trainer(config, tokenizer, graph_task)
        values[temperature] = trainer.validation_loss()
        held_out = [e for e in trainer.eval_examples if e.completion is not None]
        batch = dataset_batch(tokenizer, held_out)
        with torch.no_grad():
            student = batch_logits(trainer.student, batch, len(tokenizer))
            divergence = token_divergence(
                student,
                trainer.teacher.logits(batch),
                "skew_forward_kl",
                alpha=config.loss.alpha,
                temperature=temperature,
            )
        expected = float(masked_token_sum(divergence, batch.response_mask)) / batch.num_tokens
        assert values[temperature] == pytest.approx(expected, rel=1e-5)
    assert values[1.0] != pytest.approx(values[2.5], rel=1e-3)


def _mixed_sample(tokenizer, graph_task, mix=0.5):
    """A teacher-mixed rollout and both models' logits on it (the student's as a leaf)."""
    from opdistill.batch import batch_logits
    from opdistill.rollout import TeacherMixedRollout

    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)
    torch.manual_seed(0)
    batch = TeacherMixedRollout(student, teacher, tokenizer, mix).generate(
        graph_task.examples("train", 8), 6, temperature=1.0
    )
    with torch.no_grad():
        student_logits = batch_logits(student.eval(), batch, len(tokenizer))
        teacher_logits = batch_logits(teacher.eval(), batch, len(tokenizer))
    return batch, student_logits.requires_grad_(), teacher_logits


def _minillm_grad(config, batch, student_logits, teacher_logits):
    loss = distillation_loss(config, student_logits, teacher_logits, batch, 1.0)
    return torch.autograd.grad(loss[batch.response_mask.bool()].sum(), student_logits)[0]


def _minillm_config(clip, temperature=1.0, mix=0.5):
    minillm = MiniLLMConfig(teacher_mix=mix, clip=clip)
    return Config(loss=LossConfig(kind="minillm", minillm=minillm, temperature=temperature))


def test_minillm_ratio_is_taken_against_the_recorded_sampler(tokenizer, graph_task):
    """With teacher-mixed samples the ratio q_θ/p̃ is far from 1, so the clip changes the gradient;
    a clip too wide to act gives the unclipped importance-weighted gradient."""
    from opdistill.losses import mixture_weights, token_logprobs

    batch, student_logits, teacher_logits = _mixed_sample(tokenizer, graph_task)
    mask = batch.response_mask.bool()
    log_q = token_logprobs(student_logits.detach(), batch.response_ids)
    log_p = token_logprobs(teacher_logits, batch.response_ids)
    ratio = (log_q - batch.sampler_logprobs).exp()
    torch.testing.assert_close(ratio[mask], mixture_weights(log_q, log_p, 0.5)[mask])
    assert ((ratio[mask] < 0.8) | (ratio[mask] > 1.2)).any()
    unclipped = _minillm_grad(_minillm_config(0.0), batch, student_logits, teacher_logits)
    wide = _minillm_grad(_minillm_config(1e6), batch, student_logits, teacher_logits)
    clipped = _minillm_grad(_minillm_config(0.2), batch, student_logits, teacher_logits)
    torch.testing.assert_close(wide, unclipped)
    assert not torch.allclose(clipped, unclipped, atol=1e-6)


def test_minillm_weights_use_the_sampling_temperature(tokenizer, graph_task):
    """At loss.temperature 2 the weights still compare with the distribution sampled at 1."""
    from opdistill.losses import minillm_loss, mixture_weights, token_logprobs

    batch, student_logits, teacher_logits = _mixed_sample(tokenizer, graph_task)
    got = _minillm_grad(_minillm_config(0.0, 2.0), batch, student_logits, teacher_logits)

    def grad_with(weights):
        loss = minillm_loss(
            student_logits,
            teacher_logits,
            batch.response_ids,
            batch.response_mask,
            importance_weights=weights,
            temperature=2.0,
        )
        return torch.autograd.grad(loss[batch.response_mask.bool()].sum(), student_logits)[0]

    log_q = token_logprobs(student_logits.detach(), batch.response_ids, temperature=2.0)
    log_p = token_logprobs(teacher_logits, batch.response_ids, temperature=2.0)
    torch.testing.assert_close(got, grad_with((log_q - batch.sampler_logprobs).exp()))
    assert not torch.allclose(got, grad_with(mixture_weights(log_q, log_p, 0.5)), atol=1e-6)


def test_minillm_clip_that_cannot_act_is_refused():
    """Fresh samples of the student alone have ratio 1: a clip there would do nothing."""
    with pytest.raises(OpdistillError, match=r"clip=0\.2 has no effect with .*teacher_mix=0"):
        validate_minillm(clip=0.2, teacher_mix=0.0)
    validate_minillm(clip=0.2, teacher_mix=0.2)
    validate_minillm(clip=0.2, teacher_mix=0.0, adaptive=True)
    validate_minillm(clip=0.0, teacher_mix=0.0)


def validate_minillm(clip, teacher_mix, adaptive=False):
    from opdistill.config import validate

    config = Config(
        model=ModelConfig(student="s", teacher="t"),
        loss=LossConfig(kind="minillm", minillm=MiniLLMConfig(teacher_mix=teacher_mix, clip=clip)),
        train=TrainConfig(adaptive_source=AdaptiveSourceConfig(enabled=adaptive)),
        data=DataConfig(eval_size=4),
    )
    validate(config)


def test_step_loss_adds_the_weighted_anchor_to_every_token():
    """loss(base_logits) = loss + w·token_mean(D_anchor(π_base‖q_θ)), D_anchor = anchor_kind."""
    from opdistill.config import Config, SelfDistillConfig
    from opdistill.objectives import step_loss

    g = torch.Generator().manual_seed(3)
    student, teacher, base = (torch.randn(2, 4, 9, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = Batch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), mask * 2, mask)
    for kind in ("forward_kl", "reverse_kl"):
        config = Config(self_distill=SelfDistillConfig(anchor_weight=0.4, anchor_kind=kind))
        counts = (int(mask.sum()), 2)
        plain = step_loss(config, student, teacher, batch, counts)
        anchored = step_loss(config, student, teacher, batch, counts, base_logits=base)
        extra = 0.4 * token_divergence(student, base, kind)[mask.bool()].sum() / mask.sum()
        torch.testing.assert_close(anchored, plain + extra)
