"""Loading causal LMs and tokenizers, tiny models for tests and demos, and compatibility checks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opdistill.config import is_served_teacher
from opdistill.errors import OpdistillError
from opdistill.models import gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MODEL_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def _resolve(spec: str, what: str, needs: tuple[str, ...] = (), convert: bool = True) -> str:
    """The local path `spec` names, else `spec` as a hub id.

    A `gguf:` spec resolves to its cached float32 directory, converted on first use (only located
    and checked with `convert=False`; see `opdistill.models.gguf`). A missing local path, a file, or
    a directory holding none of `needs` is an error.
    """
    if gguf.is_gguf_spec(spec):
        try:
            return str(gguf.gguf_model_dir(spec) if convert else gguf.check_gguf_spec(spec))
        except OpdistillError as error:
            raise OpdistillError(f"{what} {error}") from None
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            hint = (
                f"; write '{gguf.PREFIX}{spec}' to load a GGUF file"
                if path.suffix == ".gguf"
                else "; give the directory that holds it"
            )
            raise OpdistillError(f"{what} path {spec!r} is a file{hint}")
        if needs and not any((path / name).is_file() for name in needs):
            raise OpdistillError(
                f"{what} directory {spec!r} has no {' or '.join(needs)} "
                "(expected a directory written by save_pretrained)"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise OpdistillError(f"{what} path {spec!r} does not exist")
    return spec


def check_model_paths(student: str, teacher: str | None, tokenizer: str | None) -> None:
    """Check the local paths of a `model:` config section without loading anything."""
    for key, spec, needs in (
        ("model.student", student, MODEL_FILES),
        ("model.teacher", teacher, MODEL_FILES),
        ("model.tokenizer", tokenizer, TOKENIZER_FILES),
    ):
        if spec and not (key == "model.teacher" and is_served_teacher(spec)):
            _resolve(spec, key, needs, convert=False)


def _first_line(error: Exception) -> str:
    """The error's message on one line (whitespace runs collapsed), cut to 300 characters."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


def _load_error(what: str, spec: str, source: str, error: Exception) -> OpdistillError:
    reason = _first_line(error)
    head = re.search(r"<class '(?:[\w.]*\.)?(\w+)'> for this kind of AutoModel", reason)
    if head:
        reason = f"its architecture ({head.group(1)}) has no causal-LM head"
    elif not Path(source).expanduser().exists():
        reason = f"no such local directory, and not loadable from the Hugging Face Hub ({reason})"
    return OpdistillError(f"cannot load {what} {spec!r}: {reason}")


def load_model(spec: str, dtype: str = "float32") -> PreTrainedModel:
    """Load a Hugging Face causal LM from a local directory, a hub id or a `gguf:` spec."""
    if dtype not in DTYPES:
        raise OpdistillError(f"unknown dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    source = _resolve(spec, "model", MODEL_FILES)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], output_loading_info=True
        )
    except Exception as error:  # transformers, safetensors and torch raise many types
        raise _load_error("causal LM", spec, source, error) from error
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied_names = set(tied) | set(tied.values()) if isinstance(tied, dict) else set(tied)
    missing = sorted(set(info.get("missing_keys", ())) - tied_names)
    if missing:  # transformers would start these weights at random
        raise OpdistillError(
            f"model {spec!r}: its config.json describes {len(missing)} weights that its weight "
            f"files do not hold (e.g. {missing[0]}); fix config.json (e.g. num_hidden_layers) "
            "or the weights"
        )
    return model


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, key: str) -> None:
    """Refuse a model with fewer embeddings than the tokenizer has tokens."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise OpdistillError(
            f"{key}: the model has {rows} token embeddings but the tokenizer has "
            f"{len(tokenizer)} tokens; ids >= {rows} would have no embedding"
        )


def load_model_config(spec: str) -> PretrainedConfig:
    """The config of the model `spec` names (no weights are loaded)."""
    source = _resolve(spec, "model", MODEL_FILES)
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as error:
        raise _load_error("model config", spec, source, error) from error


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer (directory, hub id or `gguf:` spec); its EOS pads if it has no pad token."""
    source = _resolve(spec, "tokenizer", TOKENIZER_FILES)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise _load_error("tokenizer", spec, source, error) from error
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


def truncated_copy(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A new model made of the first `num_layers` decoder layers of `model`.

    The embeddings, the final norm and the output head are copied too (tied embeddings stay
    tied); the copy shares no storage with `model`. Works for decoder-only models whose layers
    are numbered `*.layers.N.*` in the state dict and counted by `config.num_hidden_layers`.
    """
    total = model.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise OpdistillError(f"num_layers must be between 1 and {total}, got {num_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    layer = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    weights = {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if not ((match := layer.search(name)) and int(match.group(1)) >= num_layers)
    }
    dtype = next(model.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.load_state_dict(weights)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


PROBE_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "12 + 7 = 19 . #### 19",
    "edges: A>B B>C . path from A to C .",
    "def f(x):\n    return x ** 2  # ünïcödé, 中文, emoji 🙂",
)


def _first_vocab_difference(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase
) -> str:
    """The lowest token id that means different things, as a phrase naming both tokens."""
    by_id_t = {i: tok for tok, i in teacher.get_vocab().items()}
    by_id_s = {i: tok for tok, i in student.get_vocab().items()}
    for i in sorted(set(by_id_t) | set(by_id_s)):
        tok_t, tok_s = by_id_t.get(i), by_id_s.get(i)
        if tok_t != tok_s:
            if tok_t is None or tok_s is None:
                side = "student" if tok_t is None else "teacher"
                return f"first at token id {i}: {tok_t or tok_s!r} only in the {side}"
            return f"first at token id {i}: {tok_t!r} in the teacher, {tok_s!r} in the student"
    return "the ids agree; the added tokens differ"


def _template_text(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = tokenizer.chat_template
    return json.dumps(template, sort_keys=True) if isinstance(template, dict) else template


def _first_template_difference(teacher: str | None, student: str | None) -> str:
    """Where two chat templates first differ, with a snippet of each."""
    if teacher is None or student is None:
        return f"the {'teacher' if teacher is None else 'student'}'s tokenizer has none"
    at = next(
        (i for i, (a, b) in enumerate(zip(teacher, student, strict=False)) if a != b),
        min(len(teacher), len(student)),
    )
    return (
        f"first at character {at}: teacher {teacher[at : at + 30]!r}, "
        f"student {student[at : at + 30]!r}"
    )


def check_tokenizers_match(
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    extra_texts: tuple[str, ...] = (),
) -> None:
    """Stop unless teacher and student tokenize alike and share one chat template.

    Distillation compares distributions id by id, so both sides must agree on what every id means,
    and both must see the prompt formatted alike.
    """
    if teacher is student:
        return
    if len(teacher) != len(student):
        raise OpdistillError(
            f"teacher and student tokenizers differ in size ({len(teacher)} vs {len(student)}); "
            f"{_first_vocab_difference(teacher, student)}"
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
        differing = sum(vocab_t.get(tok) != vocab_s.get(tok) for tok in set(vocab_t) | set(vocab_s))
        raise OpdistillError(
            f"teacher and student vocabularies differ on {differing} tokens, "
            f"{_first_vocab_difference(teacher, student)}"
        )
    template_t, template_s = _template_text(teacher), _template_text(student)
    if template_t != template_s:
        raise OpdistillError(
            "teacher and student tokenizers use different chat templates (tokenizer.chat_template "
            f"differs, {_first_template_difference(template_t, template_s)})"
        )


def check_dtypes(dtype: str, **models: torch.nn.Module | None) -> None:
    """The given models (student, in-process teacher) hold their weights in `model.dtype`, in
    which `build_trainer` loads them (models passed in directly must agree with it)."""
    expected = DTYPES[dtype]
    for name, model in models.items():
        if model is None:
            continue
        found = next((p.dtype for p in model.parameters() if p.is_floating_point()), expected)
        if found != expected:
            raise OpdistillError(
                f"model.dtype={dtype!r}, but the {name}'s weights are {found}: "
                "load the student and the teacher in model.dtype"
            )
