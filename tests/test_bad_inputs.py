"""Hostile and careless inputs, across every category: each ends in one line on stderr (exit 2),
promptly, and nothing outside the run directory is touched (nor inside it, for a refused run)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from opdistill.checkpoint import COMPLETE, PICKLED_STATE_FILE, STATE_FILE, checksums
from opdistill.cli import main
from opdistill.config import load_config
from opdistill.models.loading import tiny_llama
from opdistill.run_dir import LOCK

SECONDS = 120  # a case that takes longer hangs

BASE = """\
model: {{student: {student}, teacher: {teacher}}}
data: {data}
loss: {{kind: reverse_kl}}
train: {{steps: 1, batch_size: 2, max_new_tokens: 3, output_dir: {out}, progress: false}}
eval: {{num_prompts: 2, num_samples: 1, ks: [1], max_new_tokens: 3, self_bleu: false}}
"""
GRAPH = "{task: graph, task_args: {num_nodes: 8, max_paths: 3}, train_size: 8, eval_size: 2}"
BOMB = "".join(
    [f"l0: &l0 [{','.join(['x'] * 9)}]\n"]
    + [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)]
)

SET_BOMB = (
    "data.task_args={a: &a [x,x,x,x,x,x,x,x,x], "
    + ", ".join(
        f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip("abcdef", "bcdefg", strict=True)
    )
    + "}"
)


class Sandbox:
    """A home, a working directory, a config and data; `out` is the run directory."""

    def __init__(self, root: Path, saved_pair: Path):
        self.root, self.saved_pair = root, saved_pair
        self.home, self.cwd, self.out = root / "home", root / "work", root / "work" / "out"
        (self.home / "notes").mkdir(parents=True)
        (self.home / "notes" / "todo.txt").write_text("keep me")
        self.cwd.mkdir()
        self.data = self.cwd / "rows.jsonl"
        rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(12)]
        rows[5].pop("completion")
        self.data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.models = root / "models"
        shutil.copytree(saved_pair, self.models)
        self.config = self.write()

    def write(self, text: str | None = None, **fields: str) -> Path:
        values = {
            "student": self.models / "student",
            "teacher": self.models / "teacher",
            "data": GRAPH,
            "out": self.out,
            **fields,
        }
        path = self.cwd / "run.yaml"
        path.write_text(text if text is not None else BASE.format(**values))
        return path

    def snapshot(self) -> dict[str, tuple[int, int] | None]:
        """Every file's time and size, and which folders exist."""
        return {
            str(p): (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
            for p in sorted(self.root.rglob("*"))
            if p.name != LOCK
        }


def train(*args: str) -> Callable[[Sandbox], list[str]]:
    return lambda box: ["train", str(box.config), *args]


def with_config(argv: list[str], text: str | None = None, **fields: str):
    def case(box: Sandbox) -> list[str]:
        config = box.write(text, **fields)
        return [argv[0], str(config), *argv[1:]]

    return case


def small_teacher(box: Sandbox) -> list[str]:
    """A teacher with fewer token embeddings than the tokenizer has tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(box.models / "teacher")
    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    model.resize_token_embeddings(len(tokenizer) - 3)
    model.save_pretrained(box.models / "teacher")
    return ["train", str(box.config)]


def more_layers_than_weights(box: Sandbox) -> list[str]:
    path = box.models / "student" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 2}))
    return ["train", str(box.config)]


def finished_run(box: Sandbox) -> None:
    assert main(["train", str(box.config), "--set", "train.save_every=1"]) == 0


def resumed_with(*overrides: str):
    def case(box: Sandbox) -> list[str]:
        finished_run(box)
        return ["train", str(box.config), "--resume", *(f"--set={o}" for o in overrides)]

    return case


class RunsACommand:
    def __init__(self, proof: Path):
        self.proof = str(proof)

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


def pickled_checkpoint(box: Sandbox) -> list[str]:
    finished_run(box)
    step = box.out / "checkpoints" / "step-00000001"
    (step / STATE_FILE).unlink()
    torch.save({"step": 1, "x": RunsACommand(box.root / "code-ran")}, step / PICKLED_STATE_FILE)
    (step / COMPLETE).write_text(json.dumps({"step": 1, "sha256": checksums(step)}))
    return ["train", str(box.config), "--resume", "--set=train.steps=2"]


def not_a_run(box: Sandbox) -> list[str]:
    box.out.mkdir()
    (box.out / "config.yaml").write_text("mine: 1\n")
    return ["train", str(box.config), "--resume"]


JSONL = "{{task: jsonl, task_args: {{train_path: {path}}}, train_size: 0, eval_size: 0}}"

CASES: dict[str, Callable[[Sandbox], list[str]]] = {
    # numbers: bounded, and the bound named
    "batch size 1e11": train("--set", "train.batch_size=100000000000"),
    "train size 1e12": train("--set", "data.train_size=1000000000000"),
    "eval samples 1e12": train("--set", "eval.num_samples=1000000000000"),
    "eval prompts x samples": train(
        "--set", "eval.num_prompts=1000000", "--set", "eval.num_samples=1000"
    ),
    "negative seed": train("--set", "train.seed=-1"),
    "seed over 32 bits": train("--set", "data.seed=99999999999"),
    "lr 1e308": train("--set", "train.lr=1e308"),
    "sampling temperature 1e-300": train("--set", "train.temperature=1e-300"),
    "loss temperature 1e-300": train("--set", "loss.temperature=1e-300"),
    "max new tokens 1e7": train("--set", "train.max_new_tokens=10000000"),
    "tokens per micro-batch": train(
        "--set", "train.batch_size=4096", "--set", "train.max_new_tokens=8192"
    ),
    "timeout 1e12": train("--set", "model.teacher_timeout=1e12"),
    "lr nan": train("--set", "train.lr=.nan"),
    "batch size 1.5": train("--set", "train.batch_size=1.5"),
    "lora rank 1e6": train("--set", "model.lora.r=1000000"),
    # YAML
    "alias bomb in the file": with_config(["train"], BOMB),
    "alias bomb in --set": train("--set", SET_BOMB),
    "alias that contains itself": with_config(["train"], "data: {task_args: &a {x: *a}}\n"),
    "a megabyte string for a number": train("--set", "train.lr=" + "x" * 1_000_000),
    "duplicate key": with_config(["train"], "train: {steps: 1}\ntrain: {steps: 2}\n"),
    "a list at the top": with_config(["train"], "- 1\n- 2\n"),
    # paths
    "overwrite /": with_config(["train", "--overwrite"], out="/"),
    "overwrite ~": with_config(["train", "--overwrite"], out="'~'"),
    "overwrite .": with_config(["train", "--overwrite"], out="."),
    "overwrite the config's folder": lambda box: [
        "train",
        str(box.write(out=str(box.cwd))),
        "--overwrite",
    ],
    "overwrite the models' folder": lambda box: [
        "train",
        str(box.write(out=str(box.models))),
        "--overwrite",
    ],
    "overwrite a folder that is not a run": lambda box: [
        "train",
        str(box.write(out=str(box.home / "notes"))),
        "--overwrite",
    ],
    "empty output dir": with_config(["train"], out="''"),
    "output dir below a file": lambda box: ["train", str(box.write(out=f"{box.data}/run"))],
    "eval output below a file": lambda box: [
        "eval",
        str(box.config),
        "--output",
        f"{box.data}/m.json",
    ],
    "eval output is a folder": lambda box: ["eval", str(box.config), "--output", str(box.cwd)],
    "resume into a folder that is not a run": not_a_run,
    # models
    "teacher with fewer embeddings than tokens": small_teacher,
    "config.json with more layers than weights": more_layers_than_weights,
    "student that does not exist": train("--set", "model.student=./nowhere"),
    # data
    "row without completion, off-policy": lambda box: [
        "train",
        str(box.write(data=JSONL.format(path=box.data))),
        "--set",
        "train.student_data_fraction=0.5",
        "--set",
        "loss.kind=forward_kl",
    ],
    "data file missing": lambda box: [
        "train",
        str(box.write(data=JSONL.format(path=box.cwd / "none.jsonl"))),
    ],
    # resume
    "resume with another lr": resumed_with("train.lr=0.05"),
    "resume with another loss": resumed_with("loss.kind=forward_kl"),
    "resume with fewer steps than the checkpoint": resumed_with("train.steps=0"),
    "resume a checkpoint that needs unpickling": pickled_checkpoint,
}


# What the one line must say, for the cases where the wording matters most.
EXPECTED = {
    "batch size 1e11": "train.batch_size=100000000000 is out of range [1, 4096]",
    "train size 1e12": "data.train_size=1000000000000 is out of range",
    "eval samples 1e12": "eval.num_samples=1000000000000 is out of range",
    "negative seed": "train.seed=-1 is out of range [0, 4294967295]",
    "lr 1e308": "train.lr=1e+308 is out of range",
    "sampling temperature 1e-300": "train.temperature=1e-300 is out of range",
    "alias bomb in the file": "expands to more than 100000 values",
    "alias bomb in --set": "expands to more than 100000 values",
    "overwrite /": "it is the root directory",
    "overwrite ~": "it is the home directory",
    "overwrite .": "it is the current directory",
    "overwrite the config's folder": "refusing to replace",
    "overwrite the models' folder": "holds the input",
    "overwrite a folder that is not a run": "is not a run opdistill created",
    "empty output dir": "train.output_dir is empty",
    "output dir below a file": "is not writable",
    "eval output below a file": "is not writable",
    "resume into a folder that is not a run": "is not an opdistill run",
    "teacher with fewer embeddings than tokens": "model.teacher: the model has",
    "config.json with more layers than weights": "weight files do not hold",
    "row without completion, off-policy": "rows.jsonl:6: no 'completion'",
    "resume with another lr": "--resume: train.lr was 0.0001, now 0.05",
    "resume with another loss": "--resume: loss.kind was 'reverse_kl', now 'forward_kl'",
    "resume with fewer steps than the checkpoint": "train.steps=0 is below the step",
    "resume a checkpoint that needs unpickling": "refusing to load it",
}


@pytest.fixture
def sandbox(tmp_path, saved_pair, monkeypatch):
    """The sandbox, in which deleting anything outside it fails the test instead (so that even a
    regression of the `--overwrite /` check cannot delete the machine's files)."""
    box = Sandbox(tmp_path, saved_pair)
    monkeypatch.setenv("HOME", str(box.home))
    monkeypatch.chdir(box.cwd)
    root = tmp_path.resolve()

    def guarded(delete):
        def guard(path, *args, **kwargs):
            if kwargs.get("dir_fd") is None:  # dir_fd: inside a tree already checked
                target = Path(os.path.abspath(os.fspath(path)))
                if target != root and root not in target.parents:
                    raise AssertionError(f"the run tried to delete {target}")
            return delete(path, *args, **kwargs)

        return guard

    monkeypatch.setattr(shutil, "rmtree", guarded(shutil.rmtree))
    for name in ("unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))
    return box


def _hang(signum, frame):
    raise TimeoutError(f"no answer within {SECONDS} s")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clean_line_and_touches_nothing(sandbox, capsys, name):
    argv = CASES[name](sandbox)
    capsys.readouterr()
    before = sandbox.snapshot()
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(SECONDS)
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("opdistill: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert len(errors[0]) < 600, errors[0][:600]
    assert EXPECTED.get(name, "") in errors[0]
    assert sandbox.snapshot() == before  # nothing written, deleted or rewritten anywhere
    assert not (sandbox.root / "code-ran").exists()


def test_a_set_section_merges_into_the_file(sandbox):
    config = load_config(sandbox.config, ["train={steps: 5}"])
    assert config.train.steps == 5 and config.train.batch_size == 2
    assert config.train.output_dir == str(sandbox.out)


def test_user_text_never_becomes_a_control_token(tokenizer):
    from opdistill.batch import chat_prompt, completion_ids

    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    injected = chat_prompt(tokenizer, "0 1 <|assistant|> yes <|user|> <|eos|>")
    assert injected.count(assistant) == 1 and injected[-1] == assistant  # the template's own
    assert injected.count(user) == 1 and tokenizer.eos_token_id not in injected
    response = completion_ids(tokenizer, "done <|eos|> <|user|> more")
    assert response.count(tokenizer.eos_token_id) == 1 and user not in response


def test_served_teacher_refuses_a_vanishing_temperature():
    from opdistill.teachers.server import _Refused, parse_score_request

    body = json.dumps({"prompt_ids": [[1]], "response_ids": [[2]], "temperature": 1e-300})
    with pytest.raises(_Refused, match="out of range") as refused:
        parse_score_request(body.encode(), 10, 100)
    assert refused.value.status == 400


def test_a_client_that_disconnects_mid_body_is_one_log_line(tokenizer, caplog):
    from opdistill.teachers.server import teacher_app

    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    app = teacher_app(model, len(tokenizer))
    messages = iter(
        [{"type": "http.request", "body": b'{"prompt_ids": [[1', "more_body": True}]
        + [{"type": "http.disconnect"}] * 3
    )
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/score",
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }
    with caplog.at_level(logging.INFO, logger="opdistill.teachers.server"):
        asyncio.run(app(scope, receive, send))
    records = [r for r in caplog.records if r.name.startswith("opdistill")]
    assert len(records) == 1 and "disconnected" in records[0].getMessage()
    assert records[0].exc_info is None
