import json

import pytest

from opdistill.batch import chat_prompt
from opdistill.cli import main
from opdistill.config import DataConfig
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama
from opdistill.prompts import (
    context_window,
    fit_prompts,
    fit_split,
    prompt_lengths,
    prompt_token_limit,
)
from opdistill.tasks.base import Example


def test_prompt_lengths_match_chat_prompt(tokenizer, graph_task):
    examples = graph_task.examples("train", 20)
    expected = [len(chat_prompt(tokenizer, e.prompt)) for e in examples]
    assert prompt_lengths(tokenizer, examples) == expected


def test_context_window_and_limit(tokenizer):
    short = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    short.config.max_position_embeddings = 64
    long = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    long.config.max_position_embeddings = 128
    assert context_window(long, None, short) == 64
    assert context_window(None) is None
    assert prompt_token_limit(0, 64, 16) == (48, "context window 64 − max_new_tokens 16")
    assert prompt_token_limit(20, 64, 16) == (20, "data.max_prompt_tokens")
    assert prompt_token_limit(0, None, 16) == (None, "no limit")
    with pytest.raises(OpdistillError, match="leaves no room"):
        prompt_token_limit(0, 64, 64)


@pytest.fixture
def mixed(tokenizer, graph_task):
    """Graph prompts plus two long ones; the limit sits between them."""
    examples = graph_task.examples("train", 10)
    longest = max(prompt_lengths(tokenizer, examples))
    words = " ".join(["A>B"] * 30)
    long = [
        Example(prompt=f"{words} path from A to B .", meta={"source": "data.jsonl:7"}),
        Example(prompt=f"path from A to B . {words}"),
    ]
    return examples + long, longest


def test_reject_names_the_source_line(tokenizer, mixed):
    examples, limit = mixed
    with pytest.raises(OpdistillError, match=r"^data\.jsonl:7: the prompt is \d+ tokens"):
        fit_prompts(examples, tokenizer, limit, "reject")


def test_drop_counts_and_leaves_long_prompts_out(tokenizer, mixed):
    examples, limit = mixed
    fit = fit_prompts(examples, tokenizer, limit, "drop")
    assert (fit.total, fit.too_long, len(fit.examples)) == (12, 2, 10)
    assert fit.summary("train") == f"train: 2 of 12 prompts exceed {limit} tokens; dropped"


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncate_fits_and_keeps_the_chosen_end(tokenizer, mixed, side):
    examples, limit = mixed
    fit = fit_prompts(examples, tokenizer, limit, "truncate", side=side)
    assert (fit.total, fit.too_long, len(fit.examples)) == (12, 2, 12)
    assert fit.examples[:10] == examples[:10]  # short prompts untouched
    assert max(prompt_lengths(tokenizer, fit.examples)) <= limit
    first, second = (e.prompt for e in fit.examples[10:])
    if side == "left":  # the end of the prompt is kept
        assert first.endswith("path from A to B .") and second.endswith("A>B")
    else:
        assert first.startswith("A>B") and second.startswith("path from A to B .")
    assert fit.examples[10].meta == {"source": "data.jsonl:7"}


def test_truncate_fails_clearly_when_the_template_alone_is_too_long(tokenizer, mixed):
    examples, _ = mixed
    overhead = len(chat_prompt(tokenizer, ""))
    with pytest.raises(OpdistillError, match="chat template alone does not fit"):
        fit_prompts(examples, tokenizer, overhead, "truncate")


def test_dropping_everything_is_an_error(tokenizer, mixed):
    examples, _ = mixed
    with pytest.raises(OpdistillError, match="every prompt is longer than 3 tokens"):
        fit_prompts(examples, tokenizer, 3, "drop", split="train")


def test_fit_split_uses_the_data_section(tokenizer, mixed):
    examples, limit = mixed
    data = DataConfig(max_prompt_tokens=limit, long_prompts="drop")
    assert fit_split(data, tokenizer, 10_000, examples, "train", 8).too_long == 2
    assert fit_split(DataConfig(), tokenizer, None, examples, "train", 8).too_long == 0


def test_train_reports_truncated_prompts(tmp_path, saved_pair, graph_task, tokenizer, capsys):
    limit = sorted(prompt_lengths(tokenizer, graph_task.examples("train", 50)))[25]
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model: {{student: {saved_pair / "student"}, teacher: {saved_pair / "teacher"}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 50, eval_size: 4,
        max_prompt_tokens: {limit}}}
loss: {{kind: jsd, beta: 0.9}}
train: {{steps: 1, batch_size: 2, max_new_tokens: 4, output_dir: {tmp_path / "out"},
         progress: false}}
eval: {{num_prompts: 4, num_samples: 2, ks: [1, 2], max_new_tokens: 4}}
""")
    assert main(["train", str(path)]) == 2
    assert "over the limit" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # rejected before anything was written

    assert main(["train", str(path), "--set", "data.long_prompts=truncate"]) == 0
    err = capsys.readouterr().err
    assert f"prompts exceed {limit} tokens; truncated" in err
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    data = next(r for r in records if r["split"] == "data")
    assert data["train_prompts"] == 50 and 0 < data["train_long_prompts"] < 50
