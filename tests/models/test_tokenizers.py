from transformers import AutoTokenizer

from opdistill.models.tokenizers import EOS, build_word_tokenizer


def test_splits_words_punctuation_and_single_digits():
    tokenizer = build_word_tokenizer(["edges: A>B . 12 + 7 = 19 ."])
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A>B 19").input_ids)
    assert tokens == ["A", ">", "B", "1", "9"]
    assert tokenizer.decode(tokenizer("A B 19").input_ids) == "A B 1 9"


def test_chat_template_round_trip_through_save_and_load(tmp_path):
    tokenizer = build_word_tokenizer(["path from A to B ."])
    messages = [{"role": "user", "content": "path from A to B ."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|> ")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    again = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert again == text
    assert loaded.eos_token == EOS and loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded("A B").input_ids == tokenizer("A B").input_ids


def test_unknown_words_map_to_unk():
    tokenizer = build_word_tokenizer(["A B"])
    assert tokenizer("zebra").input_ids == [tokenizer.unk_token_id]


def test_decoding_keeps_punctuation_runs_apart():
    """'####' must survive a round trip (a WordPiece decoder would glue it to the previous word)."""
    tokenizer = build_word_tokenizer(["5 + 4 = 9 . #### 9"])
    text = "5 + 4 = 9 . #### 9"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
