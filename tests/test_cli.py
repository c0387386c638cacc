import json
from pathlib import Path

import pytest

from opdistill.cli import main
from opdistill.config import load_config
from opdistill.experiments import demo

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def write_config(tmp_path, saved_pair, **train):
    train_yaml = ", ".join(f"{k}: {v}" for k, v in train.items())
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model: {{student: {saved_pair / "student"}, teacher: {saved_pair / "teacher"}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 50, eval_size: 4}}
loss: {{kind: jsd, beta: 0.9}}
train: {{steps: 2, batch_size: 2, max_new_tokens: 4, output_dir: {tmp_path / "out"},
         progress: false, {train_yaml}}}
eval: {{num_prompts: 4, num_samples: 2, ks: [1, 2], max_new_tokens: 4}}
""")
    return path


def test_train_then_eval_from_yaml(tmp_path, saved_pair, capsys):
    path = write_config(tmp_path, saved_pair, save_every=1)
    assert main(["train", str(path), "--set", "train.lr=1e-3"]) == 0
    out = tmp_path / "out"
    assert (out / "final" / "config.json").exists() and (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000001",
        "step-00000002",
    ]
    final = json.loads(capsys.readouterr().out)
    assert {"accuracy", "pass@1", "pass@2", "teacher_rkl"} <= set(final)

    result = tmp_path / "eval.json"
    assert main(["eval", str(path), "--model", str(out / "final"), "--output", str(result)]) == 0
    assert "pass@2" in json.loads(result.read_text())


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path, saved_pair, capsys):
    path = write_config(tmp_path, saved_pair, save_every=2)
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"output directory '{tmp_path / 'out'}' is not empty: pass --resume" in err
    assert main(["train", str(path), "--resume", "--set", "train.steps=3"]) == 0
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-2])["step"] == 3  # resumed at 2, ran one more step
    assert main(["train", str(path), "--overwrite", "--set", "train.steps=1"]) == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=1", "--set 'train.stepz=1': unknown key 'train.stepz'"),
        ("train.steps", "--set 'train.steps': expected key=value"),
        ("train.steps=many", "--set 'train.steps=many': train.steps: expected an integer"),
        ("loss.beta=0", "jsd needs beta in (0, 1)"),
        ("model.student=/does/not/exist", "model.student path '/does/not/exist' does not exist"),
        ("model.teacher=/does/not/exist", "model.teacher path '/does/not/exist' does not exist"),
        ("model.teacher={tmp}", "model.teacher directory '{tmp}' has no config.json"),
        ("data.task=chess", "unknown task 'chess'"),
        ("data.task_args.num_nodes=x", "num_nodes: must be an integer, got 'x'"),
        ("train.output_dir={tmp}/run.yaml", "train.output_dir '{tmp}/run.yaml' is a file"),
    ],
)
def test_bad_input_is_one_line_on_stderr(tmp_path, saved_pair, capsys, override, message):
    path = write_config(tmp_path, saved_pair)
    override, message = override.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert main(["train", str(path), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("opdistill: error:") and "\n" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "{tmp}/nope.yaml"], "config file '{tmp}/nope.yaml' does not exist"),
        (["eval", "{tmp}/nope.yaml"], "config file '{tmp}/nope.yaml' does not exist"),
        (["train", "{tmp}/run.yaml", "--resume", "--overwrite"], "--resume and --overwrite"),
        (["eval", "{tmp}/run.yaml", "--output", "{tmp}"], "--output '{tmp}' is a directory"),
        (["eval", "{tmp}/run.yaml", "--model", "{tmp}/nope"], "model.student path '{tmp}/nope'"),
    ],
)
def test_bad_command_lines_are_one_line_on_stderr(tmp_path, saved_pair, capsys, argv, message):
    write_config(tmp_path, saved_pair)
    argv, message = [a.format(tmp=tmp_path) for a in argv], message.format(tmp=tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("opdistill: error:") and "\n" not in err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_and_match_the_demo_task(path):
    config = load_config(path)
    assert config.data.task == demo.TASK["task"]
    assert config.data.task_args == demo.TASK["task_args"]
    assert config.train.max_new_tokens == demo.MAX_NEW_TOKENS


def test_examples_cover_the_documented_methods():
    names = {p.stem for p in EXAMPLES}
    assert {
        "sft",
        "supervised_kd",
        "seqkd",
        "gkd_onpolicy_jsd",
        "gkd_onpolicy_rkl",
        "gkd_mixed",
        "sampled_token",
        "vopd",
        "minillm",
        "distillm",
        "taid",
        "tip",
        "position_weights",
        "gkd_reward",
        "grpo",
        "self_distill_reference",
        "self_distill_demonstration",
        "self_distill_diverse",
    } <= names


def test_train_on_user_jsonl(tmp_path, saved_pair, capsys):
    rows = [
        {"prompt": f"path from A to {g} .", "completion": f"A {g}", "answer": f"A {g}"}
        for g in "BCDEFGH"
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = tmp_path / "user.yaml"
    path.write_text(f"""
model: {{student: {saved_pair / "student"}}}
data: {{task: jsonl, task_args: {{train_path: {data}}}, train_size: 0, eval_size: 0}}
loss: {{kind: nll}}
train: {{steps: 2, batch_size: 2, student_data_fraction: 0.0, output_dir: {tmp_path / "out"},
         progress: false}}
eval: {{num_prompts: 4, num_samples: 2, ks: [1, 2], max_new_tokens: 3}}
""")
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
    data.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    assert main(["train", str(path), "--overwrite"]) == 2
    assert f"{data}:2: 'prompt' is empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()  # the old run is kept


@pytest.mark.parametrize(
    ("weights", "context", "lora"),
    [
        ("frozen", "reference", 0),
        ("ema", "demonstration", 0),
        ("live", "reference", 0),
        ("base", "demonstration", 4),
    ],
)
def test_self_distillation_from_yaml(tmp_path, saved_pair, capsys, weights, context, lora):
    path = tmp_path / "self.yaml"
    path.write_text(f"""
model: {{student: {saved_pair / "student"}, lora: {{r: {lora}}}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 50, eval_size: 4}}
loss: {{kind: reverse_kl}}
self_distill: {{enabled: true, weights: {weights}, context: {context}, demo_attempts: 2,
               template: "{{prompt}} path : {{context}}"}}
train: {{steps: 2, batch_size: 2, max_new_tokens: 4, output_dir: {tmp_path / "out"},
         progress: false, save_every: 1, log_every: 1}}
eval: {{num_prompts: 4, num_samples: 2, ks: [1, 2], max_new_tokens: 4}}
""")
    assert main(["train", str(path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2 and all("context_fraction" in r for r in train)
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000002"
    copies = {p.name for p in checkpoint.glob("*_copy.safetensors")}
    assert copies == ({"teacher_copy.safetensors"} if weights in ("frozen", "ema") else set())
    assert main(["train", str(path), "--resume", "--set", "train.steps=3"]) == 0


def test_two_teachers_over_weighted_jsonl_files(tmp_path, saved_pair, capsys):
    """model.teachers loaded from paths; rows routed by their `teacher` column or their part."""
    files = {}
    for name, goals in (("near", "BCD"), ("far", "EFGH")):
        rows = [{"prompt": f"path from A to {g} .", "completion": f"A {g}"} for g in goals]
        rows[0]["teacher"] = "small"  # a row's own column wins over its part's teacher
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = tmp_path / "multi.yaml"
    path.write_text(f"""
model:
  student: {saved_pair / "student"}
  teachers: {{big: {saved_pair / "teacher"}, small: {saved_pair / "student"}}}
data:
  mix:
    - {{task: jsonl, name: near, task_args: {{train_path: {files["near"]}}}, teacher: big}}
    - {{task: jsonl, name: far, task_args: {{train_path: {files["far"]}}}, weight: 2}}
  train_size: 6
  eval_size: 0
loss: {{kind: reverse_kl}}
train: {{steps: 2, batch_size: 3, max_new_tokens: 3, output_dir: {tmp_path / "out"},
         progress: false, log_every: 1}}
eval: {{num_prompts: 0, num_samples: 2, ks: [1, 2], max_new_tokens: 3}}
""")
    assert main(["train", str(path)]) == 2  # 'far' rows without a teacher and no weights
    assert "has no 'teacher' field and model.teacher_weights is empty" in capsys.readouterr().err
    assert main(["train", str(path), "--overwrite", "--set", "model.teacher_weights={big: 1}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    logged = {key for r in records if r["split"] == "train" for key in r}
    assert {"teacher/big/loss", "teacher/mixture/loss"} <= logged
    files["far"].write_text('{"prompt": "x", "teacher": 3}\n')
    assert main(["train", str(path), "--overwrite"]) == 2
    assert f"{files['far']}:1: 'teacher' must be a non-empty string" in capsys.readouterr().err


def test_eval_command_samples_with_vllm(tmp_path, saved_pair, tokenizer, monkeypatch):
    """`opdistill eval --set eval.backend=vllm`: an engine started on the model samples every
    evaluation row (greedy, then the samples of pass@k)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here: `make vllm` builds .venv-vllm, where CI runs this")
    from opdistill.models.loading import tiny_llama
    from opdistill.rollout.vllm import VLLMRollout

    model_dir = tmp_path / "student"  # vLLM on CPU needs heads of 32 dimensions or more
    tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2, seed=4).save_pretrained(
        model_dir
    )
    tokenizer.save_pretrained(model_dir)
    rows = []
    generate = VLLMRollout.generate
    monkeypatch.setattr(
        VLLMRollout,
        "generate",
        lambda self, examples, *a, **kw: (
            rows.append(len(examples)) or generate(self, examples, *a, **kw)
        ),
    )
    path = write_config(tmp_path, saved_pair)
    result = tmp_path / "eval.json"
    arguments = ["eval", str(path), "--model", str(model_dir), "--no-teacher"]
    arguments += ["--set", "eval.backend=vllm", "--set", "rollout.vllm_enforce_eager=true"]
    arguments += ["--set", "rollout.vllm_kv_cache_gib=0.25", "--output", str(result)]
    assert main(arguments) == 0
    assert {"accuracy", "pass@1", "pass@2"} <= set(json.loads(result.read_text()))
    assert rows == [4, 8]  # 4 prompts greedy, then 2 samples each
