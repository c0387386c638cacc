import torch

from opdistill.batch import (
    Batch,
    batch_logits,
    dataset_batch,
    left_pad,
    response_mask_after_eos,
    right_pad,
)
from opdistill.models.loading import tiny_llama


def test_padding_helpers():
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = right_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_response_mask_keeps_first_eos_and_drops_the_rest():
    ids = torch.tensor([[4, 2, 9, 2], [4, 4, 4, 4], [2, 0, 0, 0]])
    assert response_mask_after_eos(ids, eos_id=2).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
    ]


def test_logits_do_not_depend_on_padding(tokenizer):
    """Left-padded prompts and right-padded responses score exactly like unpadded sequences."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2).eval()
    prompts, responses = [[1, 5, 6, 7], [1, 8]], [[9, 10, 2], [11, 2]]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id)
    batch = Batch(prompt_ids, prompt_mask, response_ids, response_mask)
    logits = batch_logits(model, batch, len(tokenizer))
    assert logits.shape == (2, 3, len(tokenizer))
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        alone = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        n = len(response)
        assert torch.allclose(logits[row, :n], alone[:, : len(tokenizer)], atol=1e-5)


def test_dataset_batch_appends_eos_and_uses_chat_template(tokenizer, graph_task):
    examples = graph_task.examples("train", 3)
    batch = dataset_batch(tokenizer, examples)
    for row, example in enumerate(examples):
        kept = batch.response_ids[row][batch.response_mask[row].bool()].tolist()
        assert kept[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(kept[:-1]) == example.completion
        prompt = tokenizer.decode(batch.prompt_ids[row][batch.prompt_mask[row].bool()])
        assert prompt.startswith("<|bos|> <|user|>") and prompt.endswith("<|assistant|>")


def test_a_response_prefix_is_in_the_response_but_out_of_the_mask(tokenizer, graph_task):
    from opdistill.tasks import Example

    example = graph_task.examples("train", 1)[0]
    first, rest = example.completion.split(" ", 1)
    given = Example(example.prompt, rest, response_prefix=first)
    batch = dataset_batch(tokenizer, [example, given])
    plain, prefixed = batch.response_ids.tolist()
    assert plain == prefixed  # the same tokens ...
    assert batch.response_mask.tolist() == [[1] * len(plain), [0] + [1] * (len(plain) - 1)]
