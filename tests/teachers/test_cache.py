import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from opdistill.batch import dataset_batch
from opdistill.cli import main
from opdistill.config import config_from_dict
from opdistill.errors import OpdistillError
from opdistill.models.loading import load_model, load_tokenizer
from opdistill.models.tokenizers import tokenizer_fingerprint
from opdistill.tasks import make_task
from opdistill.teachers import cache as teacher_cache
from opdistill.teachers.base import ModelTeacher
from opdistill.teachers.cache import CachedTeacher
from opdistill.teachers.cache_writer import cache_examples, write_teacher_cache
from opdistill.trainer import build_trainer

K = 5
TASK = {"task": "graph", "task_args": {"num_nodes": 8, "max_paths": 3}}


def make_config(tmp_path, saved_pair, cache=None, train_size=20, **loss):
    """Supervised KD on the graph task: the in-process teacher, or the cache at `cache`."""
    model = {"student": str(saved_pair / "student")}
    if cache:
        model["teacher_cache"] = str(cache)
    else:
        model["teacher"] = str(saved_pair / "teacher")
    return config_from_dict(
        {
            "model": model,
            "data": {**TASK, "train_size": train_size, "eval_size": 4},
            "loss": {"kind": "forward_kl", **loss},
            "train": {
                "steps": 3,
                "batch_size": 4,
                "lr": 1e-2,
                "student_data_fraction": 0.0,
                "max_new_tokens": 4,
                "output_dir": str(tmp_path / "run"),
                "progress": False,
            },
            "eval": {"num_prompts": 4, "num_samples": 2, "ks": [1, 2], "max_new_tokens": 4},
        }
    )


def write(config, path, k=K, **kwargs):
    options = {"batch_size": 3, "progress": False, "examples_per_shard": 8, **kwargs}
    return write_teacher_cache(config, path, k, **options)


def visible(path):
    """The cache's files as a reader sees them (no hidden staging files)."""
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def test_cache_round_trips_the_teacher_top_k(tmp_path, saved_pair):
    config = make_config(tmp_path, saved_pair)
    report = write(config, tmp_path / "cache")
    assert visible(tmp_path / "cache") == [
        "manifest.json",
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == K and manifest["num_examples"] == 20
    assert manifest["total_tokens"] == report.num_tokens > 0
    assert manifest["total_bytes"] == report.total_bytes
    assert manifest["bytes_per_token"] == round(report.bytes_per_token, 2)
    schema = pq.read_schema(tmp_path / "cache" / "shard-00000.parquet")
    assert schema.field("indices").type == pa.list_(pa.list_(pa.int32()))
    assert schema.field("logprobs").type == pa.list_(pa.list_(pa.float32()))

    tokenizer = load_tokenizer(str(saved_pair / "student"))
    cached = CachedTeacher(tmp_path / "cache", len(tokenizer), tokenizer_fingerprint(tokenizer))
    teacher = ModelTeacher(load_model(str(saved_pair / "teacher")), len(tokenizer))
    examples, _ = cache_examples(config, tokenizer, None)
    tokens = 0
    for start in range(0, len(examples), 7):  # batches unlike those the cache was written in
        batch = dataset_batch(tokenizer, examples[start : start + 7])
        mask = batch.response_mask.bool()
        tokens += batch.num_tokens
        for k in (K, 2):
            got, want = cached.topk(batch, k), teacher.topk(batch, k)
            assert got.indices.shape == want.indices.shape == (*mask.shape, k)
            assert torch.equal(got.indices[mask], want.indices[mask])
            torch.testing.assert_close(got.logprobs[mask], want.logprobs[mask])
            torch.testing.assert_close(got.token_logprobs[mask], want.token_logprobs[mask])
            assert torch.isfinite(got.logprobs).all()  # padding included
            assert (got.logprobs.exp().sum(-1) <= 1 + 1e-5).all()
    assert tokens == report.num_tokens


def test_interrupted_cache_resumes_to_the_uninterrupted_result(tmp_path, saved_pair, monkeypatch):
    config = make_config(tmp_path, saved_pair)
    write(config, tmp_path / "straight")

    real_write_table, calls = pq.write_table, []

    def crash_on_second_shard(table, where, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # half a file, then the process dies
            where.write(b"PAR1 partial")
            raise KeyboardInterrupt
        real_write_table(table, where, **kwargs)

    monkeypatch.setattr(teacher_cache.pq, "write_table", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write(config, tmp_path / "resumed")
    cache = tmp_path / "resumed"
    assert visible(cache) == ["manifest.json", "shard-00000.parquet"]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert not manifest["complete"] and list(manifest["shards"]) == ["shard-00000.parquet"]
    with pytest.raises(OpdistillError, match=r"is incomplete \(1 of 3 shards\); run opdistill"):
        CachedTeacher(cache, manifest["vocab_size"])

    monkeypatch.setattr(teacher_cache.pq, "write_table", real_write_table)
    report = write(config, cache)
    assert (report.shards_written, report.shards_skipped) == (2, 1)
    assert sorted(p.name for p in cache.iterdir()) == visible(tmp_path / "straight")
    for name in visible(cache):
        assert (cache / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name

    again = write(config, cache)  # complete: nothing to do, the teacher is not even loaded
    assert (again.shards_written, again.shards_skipped) == (0, 3)
    assert again.num_tokens == report.num_tokens and again.total_bytes == report.total_bytes


def test_resuming_with_other_settings_is_refused(tmp_path, saved_pair):
    config = make_config(tmp_path, saved_pair)
    cache = tmp_path / "cache"
    write(config, cache)
    for kwargs, message in (
        ({"k": 3}, "was built with k=5, not 3"),
        ({"temperature": 2.0}, "was built with temperature=1.0, not 2.0"),
        ({"examples_per_shard": 4}, "was built with examples_per_shard=8, not 4"),
    ):
        with pytest.raises(OpdistillError, match=message) as info:
            write(config, cache, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(OpdistillError, match="was built with num_examples=20, not 12"):
        write(make_config(tmp_path, saved_pair, train_size=12), cache)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(OpdistillError, match="is not empty and holds no teacher cache"):
        write(config, tmp_path / "other")


def test_cached_teacher_errors_are_one_line(tmp_path, saved_pair):
    config = make_config(tmp_path, saved_pair, train_size=8)
    cache = tmp_path / "cache"
    write(config, cache)
    tokenizer = load_tokenizer(str(saved_pair / "student"))
    cached = CachedTeacher(cache, len(tokenizer), tokenizer_fingerprint(tokenizer))
    examples, _ = cache_examples(config, tokenizer, None)
    batch = dataset_batch(tokenizer, examples[:2])
    unseen = make_task(TASK["task"], **TASK["task_args"]).examples("eval", 1)
    other = dataset_batch(tokenizer, [*examples[:1], *unseen])
    cases = [
        (lambda: cached.topk(batch, K + 1), "loss.teacher_top_k=6 exceeds the k=5 of the"),
        (lambda: cached.topk(batch, K, 2.0), "at temperature 1.0, not 2.0: set loss.temperature"),
        (lambda: cached.logits(batch), "holds top-k log-probs only, not logits: set loss.teacher"),
        (
            lambda: cached.topk(other, K),
            r"is not in the teacher cache .*; was the cache built from this config's data\?",
        ),
        (lambda: CachedTeacher(cache, len(tokenizer) + 1), "for a vocabulary of"),
        (lambda: CachedTeacher(cache, len(tokenizer), "0" * 64), "with another tokenizer"),
        (lambda: CachedTeacher(tmp_path, len(tokenizer)), "holds no manifest.json"),
    ]
    for call, message in cases:
        with pytest.raises(OpdistillError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_supervised_kd_from_the_cache_matches_the_teacher(tmp_path, saved_pair):
    """Same student, same data order, same top-k loss: the cache changes nothing but the source."""
    write(make_config(tmp_path, saved_pair), tmp_path / "cache")
    losses = []
    for cache in (None, tmp_path / "cache"):
        config = make_config(tmp_path / str(bool(cache)), saved_pair, cache, teacher_top_k=K)
        trainer = build_trainer(config)
        assert (trainer.teacher_sampler is None) == bool(cache)
        losses.append([trainer.step().loss for _ in range(config.train.steps)])
        if cache:
            assert isinstance(trainer.teacher, CachedTeacher)
            metrics = trainer.evaluate()  # no distance to the teacher: it cannot score samples
            assert "accuracy" in metrics and "teacher_rkl" not in metrics
    assert all(math.isfinite(loss) for loss in losses[0])
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_cache_teacher_command(tmp_path, saved_pair, capsys):
    path = tmp_path / "kd.yaml"
    path.write_text(f"""
model: {{student: {saved_pair / "student"}, teacher_cache: {tmp_path / "cache"}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 12, eval_size: 0}}
loss: {{kind: forward_kl, teacher_top_k: 4}}
train: {{steps: 1, batch_size: 2, student_data_fraction: 0.0, max_new_tokens: 4,
         output_dir: {tmp_path / "out"}, progress: false}}
""")
    argv = ["cache-teacher", str(path), "--top-k", "4", "--batch-size", "5"]
    assert main(argv) == 2
    assert "cache-teacher needs a teacher: set model.teacher or pass --teacher" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--teacher", "http://127.0.0.1:9"]) == 2
    assert "'http://127.0.0.1:9' is a served teacher" in capsys.readouterr().err
    assert main([*argv, "--teacher", str(saved_pair / "teacher")]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith(f"opdistill: teacher cache {tmp_path / 'cache'}: 12 examples, ")
    assert "bytes per token" in out and "1 shards written, 0 already there" in out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == 4 and manifest["temperature"] == 1.0
    assert manifest["teacher"] == str(saved_pair / "teacher")
    assert main([*argv, "--teacher", str(saved_pair / "teacher"), "--top-k", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opdistill: error: teacher cache") and "was built with k=4, not 8" in err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {"teacher": "t"}}, "model.teacher_cache replaces the teacher model: remove"),
        ({"loss": {"teacher_top_k": 0}}, "top-k log-probs only: set loss.teacher_top_k"),
        ({"train": {"student_data_fraction": 0.5}}, "set train.student_data_fraction=0 and"),
        ({"train": {"off_policy_source": "teacher"}}, "covers the dataset's completions only"),
        (
            {"train": {"adaptive_source": {"enabled": True}}, "data": {"eval_size": 4}},
            "train.adaptive_source scores student samples",
        ),
        (
            {"self_distill": {"enabled": True}, "loss": {"teacher_top_k": 0}},
            "the teacher is the student itself; remove model.teacher_cache",
        ),
    ],
)
def test_teacher_cache_config_errors(changes, message):
    values = {
        "model": {"student": "s", "teacher_cache": "cache"},
        "loss": {"kind": "forward_kl", "teacher_top_k": 8},
        "train": {"student_data_fraction": 0.0},
    }
    config_from_dict(values)  # valid as it stands
    for section, entries in changes.items():
        values[section] = {**values.get(section, {}), **entries}
    with pytest.raises(OpdistillError, match=message):
        config_from_dict(values)
