import torch

from opdistill.batch import batch_logits, chat_prompt, dataset_batch
from opdistill.models.loading import tiny_llama
from opdistill.tasks.base import Example
from opdistill.teachers.context import ReferenceContext
from opdistill.teachers.privileged import PrivilegedContextTeacher, ema_update, frozen_copy

TEMPLATE = "{prompt} edges: {context} ."


def brute_force_logits(model, prompt_ids, response_ids, vocab):
    """One unpadded sequence at a time: logits predicting each response token."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1, :vocab]
    return logits


def test_privileged_teacher_scores_the_response_after_the_templated_prompt(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=4)
    examples = graph_task.examples("train", 3)
    examples.append(Example(examples[0].prompt, completion="A B"))  # no reference: completion
    batch = dataset_batch(tokenizer, examples)
    vocab = len(tokenizer)
    teacher = PrivilegedContextTeacher(model, tokenizer, vocab, ReferenceContext(), TEMPLATE)
    got = teacher.logits(batch)
    for row, example in enumerate(examples):
        context = example.reference or example.completion
        prompt = chat_prompt(tokenizer, TEMPLATE.format(prompt=example.prompt, context=context))
        length = int(batch.response_mask[row].sum())
        response = batch.response_ids[row, :length].tolist()
        with torch.no_grad():
            expected = brute_force_logits(model, prompt, response, vocab)
        torch.testing.assert_close(got[row, :length], expected, atol=1e-5, rtol=1e-4)
    assert teacher.context_fraction() == 1.0


def test_examples_without_context_use_the_plain_prompt(tokenizer, graph_task):
    class Nothing:
        def contexts(self, examples):
            return [None] * len(examples)

    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=4)
    model.train()
    batch = dataset_batch(tokenizer, graph_task.examples("train", 4))
    teacher = PrivilegedContextTeacher(model, tokenizer, len(tokenizer), Nothing(), TEMPLATE)
    with torch.no_grad():
        torch.testing.assert_close(
            teacher.logits(batch), batch_logits(model, batch, len(tokenizer))
        )
    assert model.training  # the live student's mode is restored
    assert teacher.context_fraction() == 0.0


def test_frozen_copy_and_ema_update(tokenizer):
    student = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    copy = frozen_copy(student)
    assert not any(p.requires_grad for p in copy.parameters())
    before = {n: p.clone() for n, p in copy.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(copy, student, decay=0.75)
    for name, value in copy.named_parameters():
        student_value = dict(student.named_parameters())[name]
        torch.testing.assert_close(value, 0.75 * before[name] + 0.25 * student_value)


def test_context_strength_scales_the_tilt_against_the_plain_prompt(tokenizer, graph_task):
    """α = 0 scores like the network on the student's own prompt; α = 2 doubles the PCMI."""
    from opdistill.losses import tilted_teacher_logprobs

    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=5)
    batch = dataset_batch(tokenizer, graph_task.examples("train", 3))
    vocab = len(tokenizer)

    def teacher(strength):
        return PrivilegedContextTeacher(
            model, tokenizer, vocab, ReferenceContext(), TEMPLATE, context_strength=strength
        )

    with torch.no_grad():
        plain = batch_logits(model, batch, vocab)
    context = teacher(1.0).logits(batch)
    torch.testing.assert_close(
        teacher(0.0).logits(batch), torch.log_softmax(plain, -1), atol=1e-5, rtol=1e-4
    )
    doubled = teacher(2.0).logits(batch)
    torch.testing.assert_close(doubled, tilted_teacher_logprobs(context, plain, 2.0))
    pcmi = torch.log_softmax(context, -1) - torch.log_softmax(plain, -1)
    step = doubled - torch.log_softmax(plain, -1)  # = 2·PCMI − log Z per position
    torch.testing.assert_close(
        step - step[..., :1], 2 * (pcmi - pcmi[..., :1]), atol=1e-4, rtol=1e-4
    )


def test_base_logits_are_the_initial_network_on_the_plain_prompt(tokenizer, graph_task):
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=6)
    initial = frozen_copy(student)
    batch = dataset_batch(tokenizer, graph_task.examples("train", 4))
    vocab = len(tokenizer)
    teacher = PrivilegedContextTeacher(
        student, tokenizer, vocab, ReferenceContext(), TEMPLATE, initial_network=(initial, False)
    )
    with torch.no_grad():
        expected = batch_logits(initial, batch, vocab)
        for p in student.parameters():  # the live student moves on; the base does not
            p.add_(0.1)
    torch.testing.assert_close(teacher.base_logits(batch), expected)


def test_tilt_and_anchor_share_one_plain_forward_per_batch(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=7)
    batch = dataset_batch(tokenizer, graph_task.examples("train", 3))
    teacher = PrivilegedContextTeacher(
        model, tokenizer, len(tokenizer), ReferenceContext(), TEMPLATE, context_strength=0.5
    )
    calls = []
    score = teacher._score
    teacher._score = lambda *args: calls.append(args[1]) or score(*args)
    teacher.logits(batch)
    base = teacher.base_logits(batch)
    assert len(calls) == 2  # the context prompt and the plain prompt, not the plain one twice
    with torch.no_grad():
        torch.testing.assert_close(base, batch_logits(model, batch, len(tokenizer)))
    teacher.after_optimizer_step(model)  # weights may have changed: scored afresh
    teacher.base_logits(batch)
    assert len(calls) == 3
