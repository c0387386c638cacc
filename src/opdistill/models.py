"""Loading causal LMs and tokenizers, tiny models for tests and demos, and compatibility checks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opdistill.errors import OpdistillError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(spec: str, what: str) -> str:
    """The local path `spec` names, else `spec` as a hub id; a missing local path is an error."""
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise OpdistillError(f"{what} path {spec!r} does not exist")
    return spec


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_model(spec: str, dtype: str = "float32") -> PreTrainedModel:
    """Load a Hugging Face causal LM from a local directory or a hub id."""
    if dtype not in DTYPES:
        raise OpdistillError(f"unknown dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    source = _resolve(spec, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    except (OSError, ValueError) as error:
        raise OpdistillError(f"cannot load causal LM {spec!r}: {_first_line(error)}") from error
    return model


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer; give it a pad token (its EOS) if it has none."""
    source = _resolve(spec, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise OpdistillError(f"cannot load tokenizer {spec!r}: {_first_line(error)}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise OpdistillError(f"tokenizer {spec!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise OpdistillError(
            f"tokenizer {spec!r} has no chat template; prompts are formatted with one"
        )
    return tokenizer


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    pad_vocab_to_multiple_of: int = 64,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small Llama-architecture causal LM for `tokenizer`, randomly initialised.

    The embedding matrix is padded to a multiple of `pad_vocab_to_multiple_of`, as real models do,
    so the logits carry columns beyond the tokenizer's size; opdistill ignores those.
    """
    vocab = len(tokenizer)
    padded = -(-vocab // pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of
    config = LlamaConfig(
        vocab_size=padded,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


PROBE_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "12 + 7 = 19 . #### 19",
    "edges: A>B B>C . path from A to C .",
    "def f(x):\n    return x ** 2  # ünïcödé, 中文, emoji 🙂",
)


def check_tokenizers_match(
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    extra_texts: tuple[str, ...] = (),
) -> None:
    """Stop unless teacher and student tokenize alike and share one chat template.

    Distillation compares distributions id by id, so both sides must agree on what every id means.
    """
    if teacher is student:
        return
    if len(teacher) != len(student):
        raise OpdistillError(
            f"teacher and student tokenizers differ in size ({len(teacher)} vs {len(student)})"
        )
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(teacher, name) != getattr(student, name):
            raise OpdistillError(
                f"teacher and student tokenizers differ in {name} "
                f"({getattr(teacher, name)} vs {getattr(student, name)})"
            )
    for text in PROBE_TEXTS + extra_texts:
        ids_t = teacher(text, add_special_tokens=False).input_ids
        ids_s = student(text, add_special_tokens=False).input_ids
        if ids_t != ids_s:
            first = next(
                (i for i, (a, b) in enumerate(zip(ids_t, ids_s, strict=False)) if a != b),
                min(len(ids_t), len(ids_s)),
            )
            tok_t = teacher.convert_ids_to_tokens(ids_t[first : first + 1])
            tok_s = student.convert_ids_to_tokens(ids_s[first : first + 1])
            raise OpdistillError(
                f"teacher and student tokenizers differ on {text[:40]!r}: at token {first} the "
                f"teacher has {tok_t} (ids {ids_t[first : first + 1]}) and the student "
                f"{tok_s} (ids {ids_s[first : first + 1]})"
            )
    vocab_t, vocab_s = teacher.get_vocab(), student.get_vocab()
    if vocab_t != vocab_s:
        differing = sorted(
            tok for tok in set(vocab_t) | set(vocab_s) if vocab_t.get(tok) != vocab_s.get(tok)
        )
        raise OpdistillError(
            f"teacher and student vocabularies differ on {len(differing)} tokens, "
            f"e.g. {differing[:5]}"
        )
    if teacher.chat_template != student.chat_template:
        raise OpdistillError("teacher and student tokenizers use different chat templates")
