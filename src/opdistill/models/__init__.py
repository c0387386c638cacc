"""Models and tokenizers: loading (paths, hub ids, `gguf:` specs), tiny models built from a
config, LoRA students (peft), and tokenizers trained locally."""

from opdistill.models.gguf import gguf_model_dir, is_gguf_spec
from opdistill.models.loading import (
    check_model_paths,
    check_tokenizers_match,
    count_parameters,
    load_model,
    load_model_config,
    load_tokenizer,
    tiny_llama,
    truncated_copy,
)
from opdistill.models.lora import add_lora, is_lora
from opdistill.models.tokenizers import (
    build_char_tokenizer,
    build_word_tokenizer,
    tokenizer_fingerprint,
)

__all__ = [
    "add_lora",
    "build_char_tokenizer",
    "build_word_tokenizer",
    "check_model_paths",
    "check_tokenizers_match",
    "count_parameters",
    "gguf_model_dir",
    "is_gguf_spec",
    "is_lora",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "tiny_llama",
    "tokenizer_fingerprint",
    "truncated_copy",
]
