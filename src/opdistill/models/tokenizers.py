"""Word-level tokenizers trained locally for the synthetic tasks, as transformers tokenizers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]
SPECIAL_NAMES = ("bos", "eos", "pad", "unk")  # the special token ids a fingerprint records

# One user turn and, when generating, the assistant tag; assistant turns end with EOS.
CHAT_TEMPLATE = (
    "{{ '" + BOS + "' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ '" + EOS + " ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + " ' }}{% endif %}"
)


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on `texts` (words, punctuation runs, single digits).

    The result is a transformers fast tokenizer with pad/bos/eos/unk tokens and a chat template,
    so it saves and loads with save_pretrained/from_pretrained like any hub tokenizer.
    """
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the characters of `texts` (spaces included), with the
    special tokens and chat template of `build_word_tokenizer`; decoding concatenates characters,
    so it reproduces the text exactly."""
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary (token → id, added tokens included) and the special token ids."""
    data = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special": {name: getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL_NAMES},
        "all_special_ids": sorted(tokenizer.all_special_ids),
    }
    return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode()).hexdigest()
