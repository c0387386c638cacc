"""Tasks from the user's own data: JSONL files or any `datasets` dataset on disk.

Each row has a `prompt` (required, non-empty string) and optionally a `completion` and a
`reference` (strings), an `answer` (string or number) and a `teacher` (the name of the teacher
that scores it in a multi-teacher run, kept in `Example.meta["teacher"]`). Rows with an
`answer` can be verified: a response is correct when the text after its last "####" (or the
whole response if there is none) equals the answer, ignoring whitespace differences.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opdistill.errors import OpdistillError
from opdistill.tasks.base import Example, Task, check_split, stable_hash

EVAL_FRACTION = 0.1
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


def row_to_example(
    row: Mapping[str, Any],
    where: str,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    reference_field: str = "reference",
    answer_field: str = "answer",
) -> Example:
    """Validate one row and make it an Example; errors start with `where` (e.g. "f.jsonl:3")."""
    if prompt_field not in row or row[prompt_field] is None:
        raise OpdistillError(f"{where}: missing '{prompt_field}'")
    prompt = row[prompt_field]
    if not isinstance(prompt, str):
        raise OpdistillError(
            f"{where}: '{prompt_field}' must be a string, got {type(prompt).__name__}"
        )
    if not prompt.strip():
        raise OpdistillError(f"{where}: '{prompt_field}' is empty")
    _check_unicode(prompt, prompt_field, where)
    texts: dict[str, str | None] = {}
    for key, col in (("completion", completion_field), ("reference", reference_field)):
        value = row.get(col)
        if value is not None and not isinstance(value, str):
            raise OpdistillError(f"{where}: '{col}' must be a string, got {type(value).__name__}")
        if value is not None:
            _check_unicode(value, col, where)
        texts[key] = value
    meta: dict[str, Any] = {"source": where}
    teacher = row.get("teacher")
    if teacher is not None:
        if not isinstance(teacher, str) or not teacher:
            raise OpdistillError(f"{where}: 'teacher' must be a non-empty string (a teacher name)")
        meta["teacher"] = teacher
    answer = row.get(answer_field)
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise OpdistillError(
                f"{where}: '{answer_field}' must be a string or a number, "
                f"got {type(answer).__name__}"
            )
        if isinstance(answer, float):
            if not math.isfinite(answer):
                raise OpdistillError(f"{where}: '{answer_field}' must be a finite number")
            answer = str(int(answer)) if answer.is_integer() else repr(answer)
        if isinstance(answer, str):
            _check_unicode(answer, answer_field, where)
        meta["answer"] = str(answer)
    return Example(
        prompt=prompt, completion=texts["completion"], reference=texts["reference"], meta=meta
    )


def _check_unicode(text: str, field: str, where: str) -> None:
    """Reject lone surrogates (JSON "\\ud800" escapes), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise OpdistillError(
            f"{where}: '{field}' holds a lone surrogate U+{ord(bad):04X}, not valid Unicode"
        ) from None


def _check_option(name: str, value: object, optional: bool = False) -> None:
    """A task option that must be a string (or a path, or None when `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise OpdistillError(f"{name}: must be a non-empty string, got {value!r}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in pairs:
        if key in row:
            raise ValueError(f"duplicate key {key!r}")
        row[key] = value
    return row


def load_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read a JSONL file of rows (blank lines skipped); a bad row raises "{path}:{line}: ..."."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise OpdistillError(f"{path}: no such file") from None
    except OSError as e:
        raise OpdistillError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
        data = data[3:]
    examples = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise OpdistillError(f"{where}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise OpdistillError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise OpdistillError(f"{where}: invalid JSON ({_one_line(e)})") from None
        if not isinstance(row, dict):
            raise OpdistillError(f"{where}: expected a JSON object, got {_json_type(row)}")
        examples.append(row_to_example(row, where))
    if not examples:
        raise OpdistillError(f"{path}: no rows (the file is empty)")
    return examples


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def load_hf_dataset(
    path: str | os.PathLike[str],
    split: str = "train",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    reference_field: str = "reference",
    answer_field: str = "answer",
) -> list[Example]:
    """Load a local `datasets` dataset and map its rows to Examples.

    `path` may be a directory written by `save_to_disk` (loaded with `load_from_disk`), a data
    file (.json/.jsonl/.csv/.tsv/.parquet/.arrow/.txt, loaded as split `split`), or anything
    `datasets.load_dataset(path, split=split)` accepts. Optional columns that are absent are
    ignored, unless their name was changed from the default (then the column must exist).
    """
    import datasets  # slow import: only when needed

    src = str(path)
    p = Path(src).expanduser()
    try:
        if p.is_dir() and any((p / f).exists() for f in _SAVED_DATASET_FILES):
            ds: Any = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise OpdistillError(
                        f"{src}: no split {split!r} (available: {', '.join(ds.keys())})"
                    )
                ds = ds[split]
        elif p.is_file():
            builder = _FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise OpdistillError(
                    f"{src}: unknown data file type {p.suffix!r} "
                    f"(known: {', '.join(sorted(_FILE_BUILDERS))})"
                )
            kwargs = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(builder, data_files={split: str(p)}, split=split, **kwargs)
        elif p.is_absolute() or src.startswith("."):
            raise OpdistillError(f"{src}: no such file or directory")
        else:  # e.g. a dataset script or a name in the local cache
            ds = datasets.load_dataset(src, split=split)
    except OpdistillError:
        raise
    except Exception as e:  # datasets raises many types; report them as one line
        raise OpdistillError(
            f"{src}: cannot load dataset ({type(e).__name__}: {_one_line(e)})"
        ) from None
    columns = list(ds.column_names)
    if prompt_field not in columns:
        raise OpdistillError(
            f"{src}: no column '{prompt_field}' for prompts (available: {', '.join(columns)})"
        )
    optional = {
        "completion": completion_field,
        "reference": reference_field,
        "answer": answer_field,
    }
    for default, col in optional.items():
        if col != default and col not in columns:
            raise OpdistillError(
                f"{src}: no column '{col}' for {default}s (available: {', '.join(columns)})"
            )
    fields = {
        "prompt_field": prompt_field,
        "completion_field": completion_field,
        "reference_field": reference_field,
        "answer_field": answer_field,
    }
    examples = [
        row_to_example(row, f"{src}[{split}] row {i}", **fields) for i, row in enumerate(ds)
    ]
    if not examples:
        raise OpdistillError(f"{src}[{split}]: no rows")
    return examples


def normalize_answer(text: str) -> str:
    """Collapse whitespace runs to single spaces and strip."""
    return " ".join(text.split())


def extract_answer(response: str) -> str:
    """The text after the last "####", or the whole response if there is none."""
    return response.rsplit("####", 1)[-1]


class UserDataTask(Task):
    """A task over fixed lists of examples (the user's data).

    If no eval examples are given, a deterministic ~10% of the distinct train prompts (chosen
    by a stable hash, independent of row order) is held out for eval. Train rows whose prompt
    also appears in eval are dropped, so the splits never share a prompt.
    """

    name = "user_data"

    def __init__(
        self,
        train: Sequence[Example],
        eval: Sequence[Example] | None = None,
        source: str = "data",
    ) -> None:
        self.source = source
        train = list(train)
        if not train:
            raise OpdistillError(f"{source}: no training rows")
        if eval is None:
            prompts = sorted({ex.prompt for ex in train}, key=lambda s: (stable_hash(s), s))
            k = max(1, round(len(prompts) * EVAL_FRACTION)) if len(prompts) > 1 else 0
            held = set(prompts[:k])
            eval = [ex for ex in train if ex.prompt in held]
        eval = list(eval)
        eval_prompts = {ex.prompt for ex in eval}
        self._rows = {
            "train": [ex for ex in train if ex.prompt not in eval_prompts],
            "eval": eval,
        }
        if not self._rows["train"]:
            raise OpdistillError(f"{source}: every training prompt also appears in the eval data")
        self._has_answers = any("answer" in ex.meta for rows in self._rows.values() for ex in rows)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """A seeded shuffle of the rows of `split`, cut to `n`.

        n <= 0, or n larger than the number of rows, returns all rows (shuffled).
        """
        check_split(split)
        rows = list(self._rows[split])
        if not rows:
            raise OpdistillError(
                f"{self.source}: too few distinct prompts to hold out an eval split; "
                "give separate eval data"
            )
        random.Random(seed).shuffle(rows)
        return rows if n <= 0 else rows[:n]

    @property
    def has_verifier(self) -> bool:
        """True when the data has an `answer` field."""
        return self._has_answers

    def is_correct(self, example: Example, response: str) -> bool:
        """The text after the last "####" (or the whole response) equals the answer."""
        if not self._has_answers:
            raise OpdistillError(
                f"{self.source}: the data has no 'answer' field, so responses cannot be checked"
            )
        if "answer" not in example.meta:
            where = example.meta.get("source", "this example")
            raise OpdistillError(f"{where}: no 'answer' to check the response against")
        got, want = extract_answer(response), str(example.meta["answer"])
        if normalize_answer(got) == normalize_answer(want):
            return True
        return "".join(got.split()) == "".join(want.split())


class JsonlTask(UserDataTask):
    """User data from JSONL files (see `load_jsonl`); eval is held out of train if not given."""

    name = "jsonl"

    def __init__(
        self, train_path: str | os.PathLike[str], eval_path: str | os.PathLike[str] | None = None
    ) -> None:
        _check_option("train_path", train_path)
        _check_option("eval_path", eval_path, optional=True)
        evals = None if eval_path is None else load_jsonl(eval_path)
        super().__init__(load_jsonl(train_path), evals, source=str(train_path))
        self.train_path, self.eval_path = train_path, eval_path


class HFDatasetTask(UserDataTask):
    """User data from a local `datasets` dataset (see `load_hf_dataset`).

    `eval_split` names a second split for eval; without it ~10% of `split` is held out.
    """

    name = "hf"

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "train",
        eval_split: str | None = None,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        reference_field: str = "reference",
        answer_field: str = "answer",
    ) -> None:
        fields = {
            "prompt_field": prompt_field,
            "completion_field": completion_field,
            "reference_field": reference_field,
            "answer_field": answer_field,
        }
        for name, value in {"path": path, "split": split, **fields}.items():
            _check_option(name, value)
        _check_option("eval_split", eval_split, optional=True)
        train = load_hf_dataset(path, split, **fields)
        evals = None if eval_split is None else load_hf_dataset(path, eval_split, **fields)
        super().__init__(train, evals, source=str(path))
