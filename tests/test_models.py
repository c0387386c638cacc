import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.models import (
    check_tokenizers_match,
    count_parameters,
    load_model,
    load_tokenizer,
    tiny_llama,
)
from opdistill.tokenizer import build_word_tokenizer


def test_tiny_llama_pads_vocab_and_round_trips(tmp_path, tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert count_parameters(loaded) == count_parameters(model)
    assert len(load_tokenizer(str(tmp_path))) == len(tokenizer)


def test_missing_paths_give_one_line_errors(tmp_path):
    with pytest.raises(OpdistillError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(OpdistillError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpdistillError, match="cannot load causal LM"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(OpdistillError, match="unknown dtype"):
        load_model(str(tmp_path / "empty"), dtype="float8")


def test_matching_tokenizers_pass(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    check_tokenizers_match(tokenizer, load_tokenizer(str(tmp_path)))


def test_tokenizer_mismatch_names_the_differing_tokens():
    teacher = build_word_tokenizer(["A B C D"])
    student = build_word_tokenizer(["A B C E"])  # same size, one word differs
    with pytest.raises(OpdistillError, match=r"at token 3 the teacher has \['D'\]"):
        check_tokenizers_match(teacher, student, extra_texts=("A B C D",))


def test_vocabulary_size_and_template_mismatch():
    teacher = build_word_tokenizer(["A B C"])
    with pytest.raises(OpdistillError, match="differ in size"):
        check_tokenizers_match(teacher, build_word_tokenizer(["A B C D"]))
    other = build_word_tokenizer(["A B C"])
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(OpdistillError, match="chat templates"):
        check_tokenizers_match(teacher, other)


def test_model_without_a_causal_lm_head_is_refused(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    DistilBertModel(config).save_pretrained(tmp_path / "encoder")
    with pytest.raises(OpdistillError, match="cannot load causal LM") as info:
        load_model(str(tmp_path / "encoder"))
    assert "\n" not in str(info.value)
