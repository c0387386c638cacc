"""User data: JSONL loading and errors, held-out eval, verifier, local `datasets` datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opdistill.errors import OpdistillError
from opdistill.tasks import Example, JsonlTask, load_hf_dataset, load_jsonl, make_task
from opdistill.tasks.user_data import HFDatasetTask, UserDataTask

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused across examples: fine


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def rows(n: int, answers: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        row = {"prompt": f"what is {i} plus 1 ?", "completion": f"{i} + 1 = {i + 1} . #### {i + 1}"}
        if answers:
            row["answer"] = i + 1
        out.append(row)
    return out


def test_load_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(
        '{"prompt": "hi", "completion": "hello", "reference": "say hello", "answer": "x y"}\n'
        "\n   \n"
        '{"prompt": "two", "answer": 2.0, "extra": [1]}\r\n'
        '{"prompt": "three", "completion": null, "answer": 0.5}'
    )
    exs = load_jsonl(p)
    assert [e.prompt for e in exs] == ["hi", "two", "three"]
    assert exs[0].completion == "hello" and exs[0].reference == "say hello"
    assert exs[0].meta["answer"] == "x y"
    assert exs[1].meta["answer"] == "2" and exs[1].completion is None
    assert exs[2].meta["answer"] == "0.5"
    assert exs[1].meta["source"] == f"{p}:4"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a",', "invalid JSON"),
        ('["prompt", "a"]', "expected a JSON object, got an array"),
        ('"just a string"', "expected a JSON object, got a string"),
        ('{"completion": "a"}', "missing 'prompt'"),
        ('{"prompt": ""}', "'prompt' is empty"),
        ('{"prompt": "   "}', "'prompt' is empty"),
        ('{"prompt": 3}', "'prompt' must be a string"),
        ('{"prompt": "a", "completion": 5}', "'completion' must be a string"),
        ('{"prompt": "a", "reference": ["x"]}', "'reference' must be a string"),
        ('{"prompt": "a", "answer": true}', "'answer' must be a string or a number"),
        ('{"prompt": "a", "answer": {"v": 1}}', "'answer' must be a string or a number"),
        ('{"prompt": "a", "answer": NaN}', "invalid JSON"),
        ('{"prompt": null}', "missing 'prompt'"),
        ('{"prompt": "a", "prompt": "b"}', "invalid JSON (duplicate key 'prompt')"),
        ('{"prompt": "a\\ud800"}', "'prompt' holds a lone surrogate U+D800"),
        ('{"prompt": "a", "completion": "\\udfff"}', "'completion' holds a lone surrogate"),
        ('{"prompt": "a", "answer": 1e999}', "'answer' must be a finite number"),
        ("[" * 100_000, "invalid JSON"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "", line, {"prompt": "ok2"}])
    with pytest.raises(OpdistillError) as info:
        load_jsonl(p)
    text = str(info.value)
    assert text.startswith(f"{p}:3: ")
    assert message in text
    assert "\n" not in text


def test_invalid_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(OpdistillError, match=r"bin.jsonl:2: not valid UTF-8"):
        load_jsonl(p)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(OpdistillError, match=r"nope\.jsonl: no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(OpdistillError, match=r"empty\.jsonl: no rows"):
        load_jsonl(empty)
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(OpdistillError, match="no rows"):
        load_jsonl(tmp_path / "blank.jsonl")
    with pytest.raises(OpdistillError, match="cannot read"):
        load_jsonl(tmp_path)


def test_bom_is_ignored(tmp_path: Path) -> None:
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert load_jsonl(p)[0].prompt == "a"


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(lines=st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=40), max_size=5))
def test_arbitrary_lines_load_or_raise_opdistill_error(tmp_path: Path, lines: list[str]) -> None:
    p = tmp_path / "fuzz.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8")
    try:
        exs = load_jsonl(p)
    except OpdistillError as e:
        assert str(p) in str(e)
        assert "\n" not in str(e)
    else:
        assert exs and all(isinstance(e, Example) and e.prompt.strip() for e in exs)


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.binary(max_size=200), prefix=st.sampled_from([b"", b'{"prompt": "ok"}\n']))
def test_arbitrary_bytes_load_or_raise_opdistill_error(
    tmp_path: Path, data: bytes, prefix: bytes
) -> None:
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(prefix + data)
    try:
        exs = load_jsonl(p)
    except OpdistillError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)
    else:
        assert all(e.prompt.strip() and e.prompt.encode("utf-8") for e in exs)


any_text = st.text(st.characters(), max_size=5)  # lone surrogates included


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    values=st.lists(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | any_text,
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
            max_leaves=6,
        )
        | st.fixed_dictionaries(
            {"prompt": any_text | st.integers()},
            optional={
                "completion": st.none() | any_text | st.integers(),
                "answer": st.none() | any_text | st.floats() | st.booleans(),
            },
        ),
        min_size=1,
        max_size=4,
    )
)
def test_arbitrary_json_values_load_or_raise(tmp_path: Path, values: list) -> None:
    p = tmp_path / "fuzz2.jsonl"
    p.write_text("\n".join(json.dumps(v) for v in values))
    try:
        exs = load_jsonl(p)
    except OpdistillError as e:
        assert str(e).startswith(f"{p}") and "\n" not in str(e)
    else:
        assert all(e.prompt.encode("utf-8") for e in exs)  # encodable: no lone surrogates


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("jsonl", {"train_path": None}, "train_path: must be a non-empty string, got None"),
        ("jsonl", {"train_path": 3}, "train_path: must be a non-empty string, got 3"),
        (
            "jsonl",
            {"train_path": "t", "eval_path": [1]},
            "eval_path: must be a non-empty string, got [1]",
        ),
        ("hf", {"path": ["d"]}, "path: must be a non-empty string, got ['d']"),
        ("hf", {"path": "d", "prompt_field": 1}, "prompt_field: must be a non-empty string, got 1"),
        ("hf", {"path": "d", "eval_split": 2}, "eval_split: must be a non-empty string, got 2"),
    ],
)
def test_task_options_of_the_wrong_type(task: str, options: dict, message: str) -> None:
    with pytest.raises(OpdistillError) as info:
        make_task(task, **options)
    assert str(info.value) == message


def test_jsonl_task_holdout(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "train.jsonl", rows(50))
    task = JsonlTask(p)
    train = task.examples("train", 0)
    evals = task.examples("eval", -1)
    assert len(train) + len(evals) == 50
    assert len(evals) == 5
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    # deterministic, seeded shuffles; n caps the count, larger n gives all rows
    assert task.examples("train", 10, seed=1) == task.examples("train", 10, seed=1)
    assert task.examples("train", 45, seed=1) != task.examples("train", 45, seed=2)
    assert len(task.examples("train", 10)) == 10
    assert len(task.examples("train", 1000)) == 45
    # the held-out rows do not depend on the file's row order
    q = write_jsonl(tmp_path / "rev.jsonl", list(reversed(rows(50))))
    assert {e.prompt for e in JsonlTask(q).examples("eval", 0)} == {e.prompt for e in evals}
    with pytest.raises(OpdistillError, match="split"):
        task.examples("test", 1)


def test_jsonl_task_duplicate_prompts_stay_on_one_side(tmp_path: Path) -> None:
    data = rows(30) + rows(30)
    task = JsonlTask(write_jsonl(tmp_path / "dup.jsonl", data))
    train, evals = task.examples("train", 0), task.examples("eval", 0)
    assert len(train) + len(evals) == 60
    assert not {e.prompt for e in train} & {e.prompt for e in evals}


def test_jsonl_task_eval_file(tmp_path: Path) -> None:
    tr = write_jsonl(tmp_path / "tr.jsonl", rows(20))
    ev = write_jsonl(tmp_path / "ev.jsonl", rows(25)[18:])  # rows 18, 19 overlap with train
    task = make_task("jsonl", train_path=str(tr), eval_path=str(ev))
    assert len(task.examples("eval", 0)) == 7
    assert len(task.examples("train", 0)) == 18
    with pytest.raises(OpdistillError, match=r"ev2\.jsonl: no such file"):
        JsonlTask(tr, tmp_path / "ev2.jsonl")


def test_single_row_has_no_eval(tmp_path: Path) -> None:
    task = JsonlTask(write_jsonl(tmp_path / "one.jsonl", rows(1)))
    assert len(task.examples("train", 0)) == 1
    with pytest.raises(OpdistillError, match="eval"):
        task.examples("eval", 1)


def test_verifier(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "v.jsonl",
        [{"prompt": "q1", "answer": 12}, {"prompt": "q2", "answer": "New  York"}, {"prompt": "q3"}],
    )
    task = JsonlTask(p)
    assert task.has_verifier
    q1, q2, q3 = sorted(
        task.examples("train", 0) + task.examples("eval", 0), key=lambda e: e.prompt
    )
    assert task.is_correct(q1, "12")
    assert task.is_correct(q1, "work ... #### 1 2 ")
    assert task.is_correct(q1, "#### 5 #### 12")
    assert not task.is_correct(q1, "#### 12 #### 5")
    assert not task.is_correct(q1, "the answer is 12")
    assert task.is_correct(q2, "#### New York")
    assert task.is_correct(q2, "  New \n York ")
    assert task.is_correct(q2, "#### NewYork")
    assert not task.is_correct(q2, "#### new york")
    with pytest.raises(OpdistillError, match=r"v.jsonl:3: no 'answer'"):
        task.is_correct(q3, "x")


def test_no_verifier(tmp_path: Path) -> None:
    task = JsonlTask(write_jsonl(tmp_path / "n.jsonl", rows(10, answers=False)))
    assert not task.has_verifier
    ex = task.examples("train", 1)[0]
    with pytest.raises(OpdistillError, match="no 'answer' field"):
        task.is_correct(ex, ex.completion)
    assert task.solution_key(ex, " a  b ") == "a b"


def test_user_data_task_from_lists() -> None:
    exs = [Example(prompt=f"p{i}") for i in range(20)]
    task = UserDataTask(exs, [Example(prompt="e")])
    assert [e.prompt for e in task.examples("eval", 0)] == ["e"]
    with pytest.raises(OpdistillError, match="no training rows"):
        UserDataTask([])
    with pytest.raises(OpdistillError, match="every training prompt"):
        UserDataTask(exs[:2], exs[:2])


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.mark.usefixtures("offline_hf")
def test_hf_saved_dataset(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"question": [f"q{i}" for i in range(20)], "sol": [f"s{i}" for i in range(20)]}
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    exs = load_hf_dataset(tmp_path / "saved", prompt_field="question", completion_field="sol")
    assert [e.prompt for e in exs[:2]] == ["q0", "q1"] and exs[1].completion == "s1"
    with pytest.raises(OpdistillError, match=r"no column 'prompt' .*available: question, sol"):
        load_hf_dataset(tmp_path / "saved")
    with pytest.raises(OpdistillError, match="no column 'ans' for answers"):
        load_hf_dataset(tmp_path / "saved", prompt_field="question", answer_field="ans")

    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(3))})
    dd.save_to_disk(str(tmp_path / "dd"))
    task = make_task("hf", path=str(tmp_path / "dd"), eval_split="test", prompt_field="question")
    assert isinstance(task, HFDatasetTask)
    assert len(task.examples("eval", 0)) == 3 and len(task.examples("train", 0)) == 17
    assert not task.has_verifier
    with pytest.raises(OpdistillError, match=r"no split 'dev' \(available: train, test\)"):
        load_hf_dataset(tmp_path / "dd", split="dev", prompt_field="question")


@pytest.mark.usefixtures("offline_hf")
def test_hf_local_files(tmp_path: Path) -> None:
    j = write_jsonl(tmp_path / "data.jsonl", rows(12))
    exs = load_hf_dataset(j)
    assert len(exs) == 12 and exs[3].meta["answer"] == "4"
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\nhello,1\nworld,2\n")
    exs = load_hf_dataset(csv, split="eval")
    assert [(e.prompt, e.meta["answer"]) for e in exs] == [("hello", "1"), ("world", "2")]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer\n,1\n")
    with pytest.raises(OpdistillError, match=r"bad.csv\[train\] row 0: missing 'prompt'"):
        load_hf_dataset(bad)
    with pytest.raises(OpdistillError, match="no such file or directory"):
        load_hf_dataset(tmp_path / "missing")
    with pytest.raises(OpdistillError, match="unknown data file type"):
        load_hf_dataset(write_jsonl(tmp_path / "x.yaml", rows(1)))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(OpdistillError, match=r"broken\.json: cannot load dataset"):
        load_hf_dataset(broken)
