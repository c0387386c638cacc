import shutil

import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.models.loading import (
    check_model_paths,
    check_tokenizers_match,
    count_parameters,
    load_model,
    load_tokenizer,
    tiny_llama,
    truncated_copy,
)
from opdistill.models.tokenizers import build_word_tokenizer


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
    with pytest.raises(OpdistillError, match=r"model path '.*nope' does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(OpdistillError, match=r"tokenizer path '.*nope' does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpdistillError, match=r"model directory '.*empty' has no config\.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(OpdistillError, match=r"tokenizer directory '.*empty' has no tokenizer_"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(OpdistillError, match="unknown dtype 'float8'"):
        load_model(str(tmp_path / "empty"), dtype="float8")


def test_hub_ids_that_cannot_be_loaded_say_so():  # offline (conftest): the Hub cannot have it
    with pytest.raises(OpdistillError, match=r"'no-such-model': no such local directory, and not"):
        load_model("no-such-model")


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("student", "{tmp}/nope", r"model\.student path '.*nope' does not exist"),
        ("teacher", "{tmp}/nope", r"model\.teacher path '.*nope' does not exist"),
        ("tokenizer", "./nope/tok", r"model\.tokenizer path '\./nope/tok' does not exist"),
        ("student", "{tmp}/empty", r"model\.student directory '.*empty' has no config\.json"),
        ("teacher", "{tmp}/empty", r"model\.teacher directory '.*empty' has no config\.json"),
        ("tokenizer", "{tmp}/empty", r"model\.tokenizer directory '.*empty' has no tokenizer_"),
        ("teacher", "{tmp}/file.txt", r"model\.teacher path '.*file\.txt' is a file"),
    ],
)
def test_model_paths_are_checked_before_loading(tmp_path, saved_pair, key, spec, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    paths = {"student": str(saved_pair / "student"), "teacher": None, "tokenizer": None}
    paths[key] = spec.format(tmp=tmp_path)
    with pytest.raises(OpdistillError, match=message) as info:
        check_model_paths(**paths)
    assert "\n" not in str(info.value)
    check_model_paths(str(saved_pair / "student"), str(saved_pair / "teacher"), None)


def test_unreadable_weights_are_one_line(tmp_path, saved_pair):
    shutil.copytree(saved_pair / "student", tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"xx")
    with pytest.raises(OpdistillError, match=r"cannot load causal LM '.*broken': Safetensor"):
        load_model(str(tmp_path / "broken"))
    with pytest.raises(OpdistillError, match=r"model path '.*config\.json' is a file"):
        load_model(str(saved_pair / "student" / "config.json"))


def test_tokenizer_without_a_chat_template_is_refused(tmp_path):
    tokenizer = build_word_tokenizer(["A B C"])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(OpdistillError, match=r"tokenizer '.*' has no chat template"):
        load_tokenizer(str(tmp_path))


def test_matching_tokenizers_pass(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    check_tokenizers_match(tokenizer, load_tokenizer(str(tmp_path)))


def test_tokenizer_mismatch_names_the_differing_tokens():
    teacher = build_word_tokenizer(["A B C D"])
    student = build_word_tokenizer(["A B C E"])  # same size, one word differs
    with pytest.raises(OpdistillError, match=r"at token 3 the teacher has \['D'\]"):
        check_tokenizers_match(teacher, student, extra_texts=("A B C D",))


def test_vocabulary_mismatch_names_the_first_differing_token():
    teacher = build_word_tokenizer(["A B C"])
    with pytest.raises(OpdistillError, match=r"differ in size \(9 vs 10\); .*id 9: 'D' only in"):
        check_tokenizers_match(teacher, build_word_tokenizer(["A B C D"]))
    with pytest.raises(OpdistillError, match=r"differ on 2 tokens, .*'D' in the teacher, 'E' in"):
        check_tokenizers_match(build_word_tokenizer(["A B C D"]), build_word_tokenizer(["A B C E"]))


def test_chat_template_mismatch_names_the_template():
    teacher = build_word_tokenizer(["A B C"])
    other = build_word_tokenizer(["A B C"])
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(OpdistillError, match=r"chat_template differs, first at character 3"):
        check_tokenizers_match(teacher, other)
    other.chat_template = None
    with pytest.raises(OpdistillError, match=r"chat_template differs, the student's tokenizer"):
        check_tokenizers_match(teacher, other)


def test_model_without_a_causal_lm_head_is_refused(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    DistilBertModel(config).save_pretrained(tmp_path / "encoder")
    with pytest.raises(OpdistillError, match=r"\(DistilBertConfig\) has no causal-LM head") as info:
        load_model(str(tmp_path / "encoder"))
    assert "\n" not in str(info.value)


def test_truncated_copy_keeps_the_first_layers(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=3, num_heads=2).eval()
    student = truncated_copy(model, 2).eval()
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert model.config.num_hidden_layers == 3
    original = model.state_dict()
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, original[name])
        assert tensor.data_ptr() != original[name].data_ptr()
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3, 4]])
    model.config.num_hidden_layers = 2  # the original, run through its first two layers only
    torch.testing.assert_close(student(ids).logits, model(ids).logits)
    with pytest.raises(OpdistillError, match="num_layers must be between 1 and 2, got 3"):
        truncated_copy(student, 3)
