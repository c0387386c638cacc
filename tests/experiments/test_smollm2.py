import json

import pytest

from opdistill.experiments.smollm2 import (
    DEFAULT_METHODS,
    DIVERSE_TEACHER,
    INSTRUCTION,
    SELF_DISTILLED_TEACHER,
    main,
    parse_args,
    run_names,
    table,
)
from opdistill.models import build_word_tokenizer, tiny_llama
from opdistill.tasks import make_task


def test_methods_that_match_nothing_stop_before_loading(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--methods", "nothing-like-it"])
    assert stopped.value.code == 2
    assert "--methods nothing-like-it: no method matches" in capsys.readouterr().err
    assert parse_args(["--methods", "preset diverse"]).methods == ["preset diverse"]


def test_seeds_must_be_positive(capsys):
    assert parse_args([]).seeds == 2
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--seeds", "0"])
    assert stopped.value.code == 2
    assert "--seeds: must be at least 1, got 0" in capsys.readouterr().err


def test_run_names_default_to_the_compared_methods():
    assert run_names(parse_args([])) == list(DEFAULT_METHODS)
    assert run_names(parse_args(["--self-distill-preset", "diverse"])) == [
        *DEFAULT_METHODS,
        DIVERSE_TEACHER,
    ]
    gkd = run_names(parse_args(["--methods", "on-policy GKD"]))
    assert gkd == ["on-policy GKD (RKL)", "on-policy GKD (JSD 0.9)"]
    assert run_names(parse_args(["--methods", "135M self-distilled (RKL"])) == [
        SELF_DISTILLED_TEACHER
    ]
    assert run_names(parse_args(["--methods", "135M", "--teacher-self-distill-lr", "0"])) == []


def test_table_shows_mean_and_std_over_seeds():
    per_seed = {
        "teacher": [{"accuracy": 1.0}],
        "SFT": [
            {"accuracy": 0.4, "seconds_per_step": 2.0},
            {"accuracy": 0.6, "seconds_per_step": 4.0},
        ],
    }
    lines = table(per_seed).splitlines()
    assert lines[0] == "| model | accuracy | s/step |"
    assert lines[2] == "| teacher | 1.000 ± 0.000 | – |"
    assert lines[3] == "| SFT | 0.500 ± 0.100 | 3.000 ± 1.000 |"


def test_quick_run_over_two_seeds_with_a_tiny_teacher(tmp_path, capsys):
    """Every stage of the experiment, with a tiny local model standing in for SmolLM2."""
    task = make_task(
        "arithmetic", num_steps=1, max_value=9, style="natural", instruction=INSTRUCTION
    )
    examples = task.examples("train", 200) + task.examples("eval", 20)
    tokenizer = build_word_tokenizer(f"{e.prompt} {e.completion} The" for e in examples)
    teacher_dir = tmp_path / "teacher"
    tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    out = tmp_path / "out"
    argv = ["--quick", "--teacher", str(teacher_dir), "--student-layers", "1"]
    argv += ["--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--seed", "3"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [3, 4]
    assert all(len(results["per_seed"][name]) == 2 for name in DEFAULT_METHODS)
    initial = next(name for name in results["summary"] if name.startswith("initial student"))
    assert len(results["per_seed"][initial]) == 1
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"{slug}-seed{seed}"
        for slug in ("sft", "supervised-kd-fkl", "on-policy-gkd-rkl")
        for seed in (3, 4)
    )
    assert "± " in capsys.readouterr().out
