"""Which directories a run may replace or resume, and one run per directory at a time."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opdistill.cli import main
from opdistill.run_dir import LOCK, MARKER, RESUMES


def write_config(tmp_path, saved_pair, output=None, **train):
    extra = "".join(f", {k}: {v}" for k, v in train.items())
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model: {{student: {saved_pair / "student"}, teacher: {saved_pair / "teacher"}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 20, eval_size: 2}}
loss: {{kind: reverse_kl}}
train: {{steps: 2, batch_size: 2, max_new_tokens: 3, save_every: 1, log_every: 1,
         output_dir: '{tmp_path / "out" if output is None else output}', progress: false{extra}}}
eval: {{num_prompts: 2, num_samples: 1, ks: [1], max_new_tokens: 3, self_bleu: false}}
""")
    return path


def run(capsys, *argv):
    capsys.readouterr()
    code = main(["train", *map(str, argv)])
    return code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture
def trained(tmp_path, saved_pair, capsys):
    """A finished two-step run with checkpoints."""
    path = write_config(tmp_path, saved_pair)
    assert run(capsys, path)[0] == 0
    return path, tmp_path / "out"


def test_a_run_writes_its_marker_and_releases_its_lock(trained):
    _, out = trained
    assert len(json.loads((out / MARKER).read_text())["run_id"]) == 32
    assert (out / LOCK).exists()


@pytest.mark.parametrize("where", ["root", "home", "cwd", "holds the config"])
def test_overwrite_never_replaces_protected_directories(
    tmp_path, saved_pair, capsys, monkeypatch, where
):
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    target = {"root": "/", "home": "~", "cwd": ".", "holds the config": str(tmp_path)}[where]
    path = write_config(tmp_path, saved_pair, output=target)
    (tmp_path / MARKER).write_text('{"run_id": "x"}')  # even a marker does not make it deletable
    before = snapshot(tmp_path)
    code, err = run(capsys, path, "--overwrite")
    assert code == 2 and "refusing to replace" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, saved_pair, capsys):
    path = write_config(tmp_path, saved_pair)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work")
    code, err = run(capsys, path, "--overwrite")
    assert code == 2 and f"no {MARKER}" in err
    assert (tmp_path / "out" / "thesis.tex").read_text() == "years of work"


def test_resume_refuses_a_directory_that_is_not_a_run(tmp_path, saved_pair, capsys):
    path = write_config(tmp_path, saved_pair)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("mine: true\n")
    (out / "metrics.jsonl").write_text('{"step": 7}\n')
    code, err = run(capsys, path, "--resume")
    assert code == 2 and "is not an opdistill run" in err
    assert (out / "config.yaml").read_text() == "mine: true\n"
    assert (out / "metrics.jsonl").read_text() == '{"step": 7}\n'


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=0.05", "train.lr"),
        ("loss.kind=forward_kl", "loss.kind"),
        ("train.batch_size=1", "train.batch_size"),
        ("data.task_args.num_nodes=9", "data.task_args.num_nodes"),
        ("train.seed=3", "train.seed"),
        ("model.student=TEACHER", "model.student"),  # another architecture
    ],
)
def test_resume_refuses_a_change_of_what_defines_the_run(
    trained, saved_pair, capsys, override, key
):
    path, out = trained
    override = override.replace("TEACHER", str(saved_pair / "teacher"))
    saved = (out / "config.yaml").read_text()
    code, err = run(capsys, path, "--resume", "--set", "train.steps=3", "--set", override)
    assert code == 2 and f"--resume: {key} was" in err and len(err.strip().splitlines()) == 1
    assert (out / "config.yaml").read_text() == saved


def test_resume_with_more_steps_keeps_the_config_and_records_the_change(trained, capsys):
    path, out = trained
    saved = (out / "config.yaml").read_text()
    assert (
        run(capsys, path, "--resume", "--set", "train.steps=3", "--set", "train.log_every=2")[0]
        == 0
    )
    assert (out / "config.yaml").read_text() == saved
    (record,) = [json.loads(line) for line in (out / RESUMES).read_text().splitlines()]
    assert record["step"] == 2
    assert record["changed"] == {"train.log_every": [1, 2], "train.steps": [2, 3]}
    assert yaml.safe_load(saved)["train"]["steps"] == 2


def test_resume_refuses_fewer_steps_than_the_checkpoint(trained, capsys):
    path, out = trained
    final = snapshot(out / "final")
    code, err = run(capsys, path, "--resume", "--set", "train.steps=1")
    assert code == 2 and "train.steps=1 is below the step of the newest checkpoint (2)" in err
    assert snapshot(out / "final") == final


@pytest.fixture
def held_lock(tmp_path):
    """Another process holding the lock of tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield holder
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("flag", [[], ["--resume"], ["--overwrite"]])
def test_a_second_run_on_a_directory_is_refused_naming_the_holder(trained, capsys, held_lock, flag):
    path, out = trained
    before = snapshot(out)
    code, err = run(capsys, path, *flag)
    if not flag:
        assert "is not empty" in err  # refused before the lock is even needed
    else:
        assert f"is in use by another run (PID {held_lock.pid})" in err
    assert code == 2 and snapshot(out) == before


def test_the_lock_goes_with_its_process(tmp_path, saved_pair, capsys, held_lock):
    path = write_config(tmp_path, saved_pair)
    held_lock.kill()  # SIGKILL: the kernel drops the lock
    held_lock.wait()
    time.sleep(0.1)
    assert run(capsys, path, "--resume")[0] == 0
    assert int((tmp_path / "out" / LOCK).read_text()) == os.getpid()


def test_output_dir_paths(tmp_path, saved_pair, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_config(tmp_path, saved_pair, output="~/runs/x")
    assert run(capsys, path)[0] == 0
    assert (tmp_path / "home" / "runs" / "x" / "final").is_dir() and not Path("~").exists()
    for output, message in (("", "train.output_dir is empty"), (f"{path}/x", "is not writable")):
        code, err = run(capsys, write_config(tmp_path, saved_pair, output=output))
        assert code == 2 and message in err
