"""Shared fixtures: a locally trained tokenizer and tiny models, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def graph_task():
    from opdistill.tasks import make_task

    return make_task("graph", num_nodes=8, path_length=2, min_paths=2, max_paths=3)


@pytest.fixture(scope="session")
def tokenizer(graph_task):
    from opdistill.models.tokenizers import build_word_tokenizer

    examples = graph_task.examples("train", 200) + graph_task.examples("eval", 20)
    return build_word_tokenizer(e.prompt + " " + e.completion for e in examples)


@pytest.fixture(scope="session")
def saved_pair(tmp_path_factory, tokenizer):
    """A tiny teacher and a tinier student saved with save_pretrained, plus the tokenizer."""
    from opdistill.models.loading import tiny_llama

    root = tmp_path_factory.mktemp("models")
    for name, size in (("teacher", 48), ("student", 32)):
        model = tiny_llama(tokenizer, hidden_size=size, num_layers=1, num_heads=2, seed=1)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root
