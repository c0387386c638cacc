"""GGUF specs: a tiny llama written as GGUF, converted once, cached, and loaded like any model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from opdistill.cli import main
from opdistill.config import load_config
from opdistill.errors import OpdistillError
from opdistill.models import gguf as opd_gguf
from opdistill.models.loading import check_model_paths, load_model, load_tokenizer
from opdistill.tasks import make_task

gguf = pytest.importorskip("gguf")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "1")]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HEADS, KV_HEADS, HIDDEN = 4, 2, 64


def _tokens() -> list[str]:
    """Special tokens, then printable ASCII, space and newline in byte-level spelling, merges."""
    chars = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"]
    return SPECIAL + chars + ["".join(pair) for pair in MERGES]


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (transformers undoes it when loading)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> LlamaForCausalLM:
    """Write a random 2-layer llama and a byte-level BPE tokenizer as an F32 GGUF file."""
    tokens = _tokens()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges([" ".join(pair) for pair in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(2):
        for hf_name, gguf_name in names.items():
            tensor = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                tensor = _permute(tensor, HEADS if gguf_name == "attn_q" else KV_HEADS)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", tensor)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OPDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


IDS = torch.tensor([[5, 40, 41, 77, 3, 99, 12, 60]])


def test_converted_copy_matches_the_gguf_model_and_is_cached(tiny, cache, monkeypatch):
    path, reference = tiny
    spec = f"gguf:{path}"
    model = load_model(spec)
    assert not hasattr(model.config, "quantization_config")
    (entry,) = cache.iterdir()
    assert entry.name.startswith("tiny-llama.F32-")
    assert json.loads((entry / opd_gguf.MANIFEST).read_text())["source"] == str(path)
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    with torch.no_grad():
        logits = model(IDS).logits
        torch.testing.assert_close(logits, direct(IDS).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, reference(IDS).logits, rtol=0, atol=1e-5)
    assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()

    def refuse(*args, **kwargs):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(opd_gguf, "convert", refuse)
    again = load_model(spec, dtype="bfloat16")
    assert again.dtype == torch.bfloat16
    tokenizer = load_tokenizer(spec)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer("the 12").input_ids) == [
        "t",
        "he",
        "Ġ1",
        "2",
    ]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [2]


def test_package_specs_find_the_packaged_file(tiny, cache, tmp_path, monkeypatch):
    path, _ = tiny
    package = tmp_path / "site" / "fake_model_pkg"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "weights" / path.name).write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = opd_gguf.find_gguf_file("gguf:fake_model_pkg")
    assert found == (package / "weights" / path.name).resolve()
    assert opd_gguf.find_gguf_file(f"gguf:fake-model-pkg/weights/{path.name}") == found
    assert opd_gguf.find_gguf_file(f"gguf:{package}") == found  # a directory
    check_model_paths("gguf:fake_model_pkg", None, None)
    assert not cache.exists()  # checking converts nothing

    (package / "other.gguf").write_bytes(b"")
    with pytest.raises(OpdistillError, match=r"holds 2 \.gguf files \(other\.gguf, weights/"):
        opd_gguf.find_gguf_file("gguf:fake_model_pkg")


def _one_line_error(spec: str, loader=load_model) -> str:
    with pytest.raises(OpdistillError) as caught:
        loader(spec)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line(tiny, cache, tmp_path, monkeypatch):
    path, _ = tiny
    assert "no installed Python package 'no_such_pkg_xyz'" in _one_line_error(
        "gguf:no_such_pkg_xyz"
    )
    assert "no such file or directory" in _one_line_error(f"gguf:{tmp_path}/nope.gguf")
    assert "give a package or a path" in _one_line_error("gguf:", load_tokenizer)
    empty = tmp_path / "site" / "empty_pkg"
    empty.mkdir(parents=True)
    (empty / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert "holds no .gguf file" in _one_line_error("gguf:empty_pkg")
    assert "has no file 'x.gguf'" in _one_line_error("gguf:empty_pkg/x.gguf")
    assert f"write 'gguf:{path}'" in _one_line_error(str(path))

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    message = _one_line_error(f"gguf:{garbage}")
    assert message.startswith(f"model 'gguf:{garbage}': cannot read GGUF file")
    assert list(cache.iterdir()) == []  # the temporary directory is gone

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(OpdistillError, match=r"model\.student 'gguf:.*pip install gguf"):
        check_model_paths(f"gguf:{path}", None, None)
    assert "pip install gguf" in _one_line_error(f"gguf:{path}")


def test_train_and_eval_from_gguf_specs(tiny, cache, tmp_path, capsys):
    path, _ = tiny
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model: {{student: "gguf:{path}", teacher: "gguf:{path}"}}
data: {{task: arithmetic, task_args: {{num_steps: 1, max_value: 5}}, train_size: 8, eval_size: 2}}
loss: {{kind: reverse_kl}}
train: {{steps: 1, batch_size: 2, max_new_tokens: 4, output_dir: {tmp_path / "out"},
         progress: false}}
eval: {{num_prompts: 2, num_samples: 2, ks: [1, 2], max_new_tokens: 4}}
""")
    assert main(["train", str(config)]) == 0
    assert "teacher_rkl" in json.loads(capsys.readouterr().out)
    assert len(list(cache.iterdir())) == 1  # student, teacher and tokenizer share one copy
    final = tmp_path / "out" / "final"
    assert main(["eval", str(config), "--model", str(final), "--no-teacher"]) == 0


REAL_EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "real").glob("*.yaml"))


@pytest.mark.parametrize("path", REAL_EXAMPLES, ids=lambda p: p.name)
def test_real_model_examples_are_valid(path):
    config = load_config(path)
    models = (config.model.teacher, config.model.student, config.model.tokenizer)
    assert any(opd_gguf.is_gguf_spec(spec) for spec in models if spec)
    task = make_task(config.data.task, **config.data.task_args)
    example = task.examples("eval", 1)[0]
    assert task.is_correct(example, example.completion)
