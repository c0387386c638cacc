import pytest
import torch

from opdistill.batch import batch_logits
from opdistill.models.loading import tiny_llama
from opdistill.rollout import HFGenerateRollout
from opdistill.rollout.hf_static import StaticRollout


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_matches_transformers_generate(tokenizer, graph_task, attention):
    """Same model, same prompts (left-padded to different lengths): greedy decoding over the
    static cache with our ready 4D masks picks generate's tokens."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    model.set_attn_implementation(attention)
    examples = graph_task.examples("eval", 5)
    ours = StaticRollout(model, tokenizer).generate(examples, 6, greedy=True)
    theirs = HFGenerateRollout(model, tokenizer).generate(examples, 6, greedy=True)
    assert torch.equal(ours.response_ids, theirs.response_ids)
    assert torch.equal(ours.response_mask, theirs.response_mask)


def test_sampler_logprobs_match_the_learner(tokenizer, graph_task):
    """log softmax(z/T)[y] recorded while sampling equals the training forward's (ρ = 1)."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=4)
    batch = StaticRollout(model, tokenizer).generate(
        graph_task.examples("eval", 6),
        max_new_tokens=7,
        temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        logits = batch_logits(model.eval(), batch, len(tokenizer)) / 0.7
    recomputed = torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1))
    mask = batch.response_mask.bool()
    assert mask.sum() > 10
    assert torch.allclose(batch.sampler_logprobs[mask], recomputed.squeeze(-1)[mask], atol=1e-4)


def test_ignores_generation_config_and_padded_columns(tokenizer, graph_task):
    """A generation_config with top-k 1 and a repetition penalty changes nothing, and no token
    beyond the tokenizer's vocabulary is ever drawn."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=5)
    assert model.get_output_embeddings().weight.shape[0] > len(tokenizer)
    with torch.no_grad():  # make the padded columns the most likely
        model.lm_head.weight[len(tokenizer) :] = 5.0
    examples = graph_task.examples("eval", 8)
    rollout = StaticRollout(model, tokenizer)
    plain = rollout.generate(examples, 6, generator=torch.Generator().manual_seed(1))
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 3.0
    again = rollout.generate(examples, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain.response_ids, again.response_ids)
    assert int(plain.response_ids.max()) < len(tokenizer)


def test_draws_follow_the_distribution(tokenizer, graph_task):
    """The first token's empirical frequencies match softmax(z/T) of the prompt (chi-square-ish:
    total variation below 0.05 over 4000 draws)."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=6)
    example = graph_task.examples("eval", 1)
    rollout = StaticRollout(model, tokenizer, record_logprobs=False)
    batch = rollout.generate(example * 4000, 1, temperature=2.0, generator=torch.Generator())
    with torch.no_grad():
        logits = batch_logits(model.eval(), batch, len(tokenizer))[0, 0] / 2.0
    expected = torch.softmax(logits, -1)
    counts = torch.bincount(batch.response_ids[:, 0], minlength=len(tokenizer)).float()
    assert 0.5 * (counts / counts.sum() - expected).abs().sum() < 0.05
    assert batch.sampler_logprobs is None


def test_eos_masking_and_training_mode(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2).train()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 0
        model.model.norm.weight.fill_(1.0)
    batch = StaticRollout(model, tokenizer).generate(graph_task.examples("eval", 8), 6)
    assert model.training
    lengths = batch.response_mask.sum(1)
    assert int(lengths.max()) == batch.response_ids.shape[1] <= 6
    for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True):
        assert tokenizer.eos_token_id not in ids[mask.bool()].tolist()[:-1]
        assert (ids[~mask.bool()] == tokenizer.pad_token_id).all()
