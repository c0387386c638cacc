import math

import torch

from opdistill.batch import batch_logits
from opdistill.models.loading import tiny_llama
from opdistill.rollout import HFGenerateRollout, TeacherMixedRollout, decode_responses
from opdistill.rollout.base import pure_generation_config, sampling_generation_config


def test_rollout_masks_after_eos_and_trims(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    # Make EOS likely so that some rows stop early.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 0
        model.model.norm.weight.fill_(1.0)
    examples = graph_task.examples("eval", 8)
    torch.manual_seed(0)
    batch = HFGenerateRollout(model, tokenizer).generate(examples, max_new_tokens=6)
    assert batch.response_ids.shape[1] <= 6
    lengths = batch.response_mask.sum(1)
    assert int(lengths.max()) == batch.response_ids.shape[1]
    for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True):
        kept = ids[mask.bool()].tolist()
        assert tokenizer.eos_token_id not in kept[:-1]
        assert (ids[~mask.bool()] == tokenizer.pad_token_id).all()
    assert len(decode_responses(tokenizer, batch)) == 8


def test_greedy_rollout_is_what_the_scoring_forward_predicts(tokenizer, graph_task):
    """The token generate picks greedily is the argmax of our recomputed logits, row by row."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    batch = HFGenerateRollout(model, tokenizer).generate(
        graph_task.examples("eval", 5), max_new_tokens=5, greedy=True
    )
    with torch.no_grad():
        logits = batch_logits(model.eval(), batch, len(tokenizer))
    predicted = logits.argmax(-1)
    mask = batch.response_mask.bool()
    assert torch.equal(predicted[mask], batch.response_ids[mask])


def test_rollout_restores_training_mode(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2).train()
    HFGenerateRollout(model, tokenizer).generate(graph_task.examples("eval", 2), 3)
    assert model.training


def test_sampler_logprobs_match_the_scoring_forward(tokenizer, graph_task):
    """The log-probs recorded while sampling equal those recomputed for training (ratio ρ = 1)."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=4)
    torch.manual_seed(0)
    batch = HFGenerateRollout(model, tokenizer).generate(
        graph_task.examples("eval", 6), max_new_tokens=5, temperature=0.7
    )
    with torch.no_grad():
        logits = batch_logits(model.eval(), batch, len(tokenizer)) / 0.7
    recomputed = torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1))
    mask = batch.response_mask.bool()
    assert torch.allclose(batch.sampler_logprobs[mask], recomputed.squeeze(-1)[mask], atol=1e-4)


def test_teacher_mixed_rollout(tokenizer, graph_task):
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=5)
    teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=6)
    examples = graph_task.examples("eval", 6)
    # With α = 0 and greedy decoding it is plain greedy decoding of the student.
    plain = HFGenerateRollout(student, tokenizer).generate(examples, 5, greedy=True)
    mixed = TeacherMixedRollout(student, teacher, tokenizer, 0.0).generate(examples, 5, greedy=True)
    assert torch.equal(plain.response_ids, mixed.response_ids)
    # With α = 0.3 the recorded log-probs are log(α·P + (1−α)·Q) of the sampled tokens.
    torch.manual_seed(1)
    batch = TeacherMixedRollout(student, teacher, tokenizer, 0.3).generate(examples, 5)
    with torch.no_grad():
        log_q = torch.log_softmax(batch_logits(student, batch, len(tokenizer)), -1)
        log_p = torch.log_softmax(batch_logits(teacher, batch, len(tokenizer)), -1)
    log_mix = torch.logaddexp(log_p + math.log(0.3), log_q + math.log(0.7))
    expected = log_mix.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask.bool()
    assert torch.allclose(batch.sampler_logprobs[mask], expected[mask], atol=1e-4)


def test_rollout_without_logprobs_samples_the_same_tokens(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=7)
    examples = graph_task.examples("eval", 4)
    batches = []
    for record in (True, False):
        torch.manual_seed(3)
        batches.append(HFGenerateRollout(model, tokenizer, record).generate(examples, 5))
    assert torch.equal(batches[0].response_ids, batches[1].response_ids)
    assert batches[0].sampler_logprobs is not None and batches[1].sampler_logprobs is None


def test_recorded_logprobs_equal_those_of_the_generate_scores(tokenizer, graph_task):
    """Gathered step by step, the sampler log-probs and the samples equal those from the [B, V]
    scores `generate(output_scores=True)` keeps at the sampling temperature."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=8)
    examples = graph_task.examples("eval", 5)
    rollout = HFGenerateRollout(model, tokenizer)
    for temperature, greedy in ((0.7, False), (1.0, False), (1.3, True)):
        torch.manual_seed(2)
        batch = rollout.generate(examples, 6, temperature=temperature, greedy=greedy)
        prompt_ids, prompt_mask = rollout.prompts.batch(examples)
        padded = range(len(tokenizer), model.get_output_embeddings().weight.shape[0])
        config = sampling_generation_config(
            6, temperature, greedy, tokenizer.eos_token_id, tokenizer.pad_token_id, padded
        )
        torch.manual_seed(2)
        with torch.no_grad(), pure_generation_config(model, config):
            output = model.eval().generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=config,
                output_scores=True,
                return_dict_in_generate=True,
            )
        response_ids = output.sequences[:, prompt_ids.shape[1] :]
        expected = torch.stack(
            [
                torch.log_softmax(score.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
                for score, ids in zip(output.scores, response_ids.unbind(1), strict=True)
            ],
            dim=1,
        )
        width = batch.response_ids.shape[1]
        mask = batch.response_mask.bool()
        assert torch.equal(batch.response_ids[mask], response_ids[:, :width][mask])
        assert torch.equal(batch.sampler_logprobs[mask], expected[:, :width][mask])


def hub_style_settings(tokenizer):
    """A `generation_config` like the ones hub models ship: every field changes the sampling."""
    banned = [tokenizer.convert_tokens_to_ids(t) for t in ("A", "B")]
    return {
        "repetition_penalty": 3.0,
        "min_p": 0.3,
        "no_repeat_ngram_size": 1,
        "typical_p": 0.2,
        "top_k": 3,
        "top_p": 0.5,
        "bad_words_ids": [[i] for i in banned if i != tokenizer.unk_token_id],
        "min_new_tokens": 4,
        "temperature": 0.3,
        "do_sample": False,
    }


def test_rollouts_ignore_the_models_generation_config(tokenizer, graph_task):
    """Samples and recorded log-probs are those of pure sampling from the model's softmax,
    whatever the model's own `generation_config` says; greedy picks the argmax."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=4)
    for key, value in hub_style_settings(tokenizer).items():
        setattr(model.generation_config, key, value)
    saved = model.generation_config.to_dict()
    examples = graph_task.examples("eval", 6)
    rollout = HFGenerateRollout(model, tokenizer)
    torch.manual_seed(0)
    batch = rollout.generate(examples, max_new_tokens=6, temperature=0.7)
    assert model.generation_config.to_dict() == saved  # restored afterwards
    with torch.no_grad():
        logits = batch_logits(model.eval(), batch, len(tokenizer))
    mask = batch.response_mask.bool()
    recomputed = torch.log_softmax(logits / 0.7, -1).gather(-1, batch.response_ids.unsqueeze(-1))
    assert torch.allclose(batch.sampler_logprobs[mask], recomputed.squeeze(-1)[mask], atol=1e-4)
    greedy = rollout.generate(examples, max_new_tokens=6, greedy=True)
    with torch.no_grad():
        predicted = batch_logits(model, greedy, len(tokenizer)).argmax(-1)
    mask = greedy.response_mask.bool()
    assert torch.equal(predicted[mask], greedy.response_ids[mask])


def test_rollouts_match_the_samples_of_a_plain_model(tokenizer, graph_task):
    """Same seed, same model weights: a model with hub-style settings samples the same tokens as
    one with none (the distribution, not only the log-probs, is the model's)."""
    plain = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=5)
    configured = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=5)
    for key, value in hub_style_settings(tokenizer).items():
        setattr(configured.generation_config, key, value)
    examples = graph_task.examples("eval", 6)
    batches = []
    for model in (plain, configured):
        torch.manual_seed(1)
        batches.append(HFGenerateRollout(model, tokenizer).generate(examples, 6, temperature=1.0))
    assert torch.equal(batches[0].response_ids, batches[1].response_ids)
