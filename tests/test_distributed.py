"""Training in two processes (gloo on CPU) matches one process with the same global batch."""

import json
import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from opdistill.checkpoint import Checkpoints
from opdistill.cli import main
from opdistill.distributed import check_checkpointing
from opdistill.distributed import check_launch as _check_launch
from opdistill.errors import OpdistillError
from opdistill.models.loading import load_model, tiny_llama
from opdistill.rollout import HFGenerateRollout, TeacherMixedRollout
from opdistill.rollout import base as rollout_base
from opdistill.rollout import hf as rollout_hf
from opdistill.tasks import make_task
from opdistill.trainer import ExampleStream

# `accelerate launch --cpu` starts a single process; `--multi_gpu` with ACCELERATE_USE_CPU=1
# starts torchrun workers that accelerate joins with the gloo backend.
LAUNCH = [
    *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"),
    *("--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"),
    *("--dynamo_backend", "no", "--main_process_port", "0"),
    *("-m", "opdistill.cli", "train"),
]
LETTERS = "ABCDEFGH"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Graph-vocabulary rows whose completions run from 1 to 8 words."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = []
    for i in range(32):
        edges = " ".join(f"{rng.choice(LETTERS)}>{rng.choice(LETTERS)}" for _ in range(1 + i % 5))
        prompt = f"path from {LETTERS[i % 8]} to {LETTERS[i // 4]} . edges: {edges} ."
        completion = " ".join(rng.choice(LETTERS) for _ in range(1 + rng.randrange(8)))
        rows.append(json.dumps({"prompt": prompt, "completion": completion}))
    path.write_text("\n".join(rows) + "\n")
    return path


def write_config(path, saved_pair, data_file, output, loss, eval_size=0, **train):
    config = {
        "model": {"student": str(saved_pair / "student"), "teacher": str(saved_pair / "teacher")},
        "data": {
            "task": "jsonl",
            "task_args": {"train_path": str(data_file)},
            "train_size": 0,
            "eval_size": eval_size,
        },
        "loss": {"kind": loss},
        "train": {
            "steps": 4,
            "batch_size": 2,
            "max_new_tokens": 6,
            "lr": 1e-2,
            "warmup_steps": 1,
            "log_every": 1,
            "progress": False,
            "output_dir": str(output),
            **train,
        },
        "eval": {"num_prompts": 2, "num_samples": 2, "ks": [1, 2], "max_new_tokens": 4},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def launch_two(tmp_path, config, *extra):
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [*LAUNCH, str(config), *extra], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def train_records(output):
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def response_tokens_per_rank(data_file, saved_pair, micro_batches):
    """Reference-completion tokens of each rank's half of the first global micro-batches."""
    from opdistill.batch import completion_ids
    from opdistill.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(saved_pair / "student"))
    stream = ExampleStream(make_task("jsonl", train_path=str(data_file)).examples("train", 0), 0)
    counts = []
    for _ in range(micro_batches):
        batch = stream.take(4)
        counts.append(
            tuple(
                sum(len(completion_ids(tokenizer, e.completion)) for e in half)
                for half in (batch[:2], batch[2:])
            )
        )
    return counts


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, saved_pair, data_file):
    """Supervised KD (λ = 0), 2 processes × batch 2 × accumulation 2 against one process with
    batch 4 × accumulation 2 and with batch 8: losses, gradient norms, schedule, final weights.
    """
    counts = response_tokens_per_rank(data_file, saved_pair, 8)
    assert any(left != right for left, right in counts)  # the global token count matters

    two = tmp_path / "two"
    config = write_config(
        tmp_path / "run.yaml",
        saved_pair,
        data_file,
        two,
        "forward_kl",
        student_data_fraction=0.0,
        grad_accum=2,
    )
    launch_two(tmp_path, config)
    records_two = train_records(two)
    weights_two = load_file(two / "final" / "model.safetensors")
    initial = load_file(saved_pair / "student" / "model.safetensors")
    assert [r["step"] for r in records_two] == [1, 2, 3, 4]
    assert any(not torch.equal(weights_two[k], initial[k]) for k in initial)

    for batch_size, grad_accum in ((4, 2), (8, 1)):
        one = tmp_path / f"one-{batch_size}"
        overrides = [
            f"train.batch_size={batch_size}",
            f"train.grad_accum={grad_accum}",
            f"train.output_dir={one}",
        ]
        assert main(["train", str(config), *(f"--set={o}" for o in overrides)]) == 0
        for a, b in zip(records_two, train_records(one), strict=True):
            assert a["tokens_per_step"] == b["tokens_per_step"]
            assert a["lr"] == pytest.approx(b["lr"], abs=1e-12)
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
        weights_one = load_file(one / "final" / "model.safetensors")
        assert weights_two.keys() == weights_one.keys()
        for name, tensor in weights_two.items():
            torch.testing.assert_close(tensor, weights_one[name], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_process_on_policy_run_checkpoints_and_resumes(tmp_path, saved_pair, data_file):
    """Reverse KL on student rollouts (λ = 1) with evaluation, checkpoints and --resume."""
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "run.yaml",
        saved_pair,
        data_file,
        output,
        "reverse_kl",
        eval_size=2,
        steps=2,
        save_every=1,
        keep_checkpoints=0,
    )
    launch_two(tmp_path, config)
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001", "step-00000002"]
    assert all((p / "COMPLETE").exists() for p in checkpoints.iterdir())
    assert (output / "final" / "model.safetensors").exists()
    assert len(list((output / "tensorboard").iterdir())) == 1  # the main process logs
    # Each process drew its own random numbers, and the checkpoint holds both states.
    saved = {}

    class Recorder:
        def load_state_dict(self, state):
            saved.update(state)

    student = load_model(str(saved_pair / "student"), "float32")
    Checkpoints(checkpoints).restore_latest(student, {"rng": Recorder()})
    first, second = saved["processes"]
    assert not torch.equal(first["torch"], second["torch"])

    launch_two(tmp_path, config, "--resume", "--set", "train.steps=3")
    records = train_records(output)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["on_policy_fraction"] == 1.0 and math.isfinite(r["loss"]) for r in records)
    assert (checkpoints / "step-00000003" / "COMPLETE").exists()
    evals = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["split"] == "eval"] == [2, 3]


def test_launch_without_a_distributed_backend_is_refused(monkeypatch):
    """torchrun without GPUs and without ACCELERATE_USE_CPU: independent copies, refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    cpu = DistributedType.MULTI_CPU
    with pytest.raises(OpdistillError, match="ACCELERATE_USE_CPU=1"):
        _check_launch(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
    _check_launch(SimpleNamespace(num_processes=2, distributed_type=cpu))


def test_deepspeed_launch_on_cpu_processes_is_refused(monkeypatch):
    """accelerate 1.15 ignores a DeepSpeed config on CPU processes and trains DDP."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(OpdistillError, match="a DeepSpeed launch on CPU processes"):
        _check_launch(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))
    _check_launch(SimpleNamespace(num_processes=2, distributed_type=DistributedType.DEEPSPEED))


def sharded_state(distributed_type, zero_stage=None, num_processes=2):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    return SimpleNamespace(
        distributed_type=distributed_type, num_processes=num_processes, deepspeed_plugin=plugin
    )


@pytest.mark.parametrize(
    ("state", "synced"),
    [
        (sharded_state(DistributedType.DEEPSPEED, zero_stage=3), True),
        (sharded_state(DistributedType.DEEPSPEED, zero_stage=2), False),
        (sharded_state(DistributedType.FSDP), True),
        (sharded_state(DistributedType.FSDP, num_processes=1), False),
        (sharded_state(DistributedType.MULTI_GPU), False),
    ],
)
def test_generation_is_synced_under_zero3_and_fsdp(
    monkeypatch, tokenizer, graph_task, state, synced
):
    monkeypatch.setattr(rollout_base, "is_initialized", lambda: True)
    monkeypatch.setattr(rollout_base, "AcceleratorState", lambda: state)
    assert rollout_base.synced_generation() is synced

    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    seen = {}
    generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**{k: v for k, v in kwargs.items() if k != "synced_gpus"})

    monkeypatch.setattr(model, "generate", spy)
    HFGenerateRollout(model, tokenizer).generate(graph_task.examples("eval", 2), 3)
    assert seen.get("synced_gpus", False) is synced


def test_teacher_mixed_rollout_keeps_stepping_until_every_process_is_done(
    monkeypatch, tokenizer, graph_task
):
    """Synced: a process whose rows all ended runs forward passes while another still decodes."""
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=5)
    teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=6)
    eos = tokenizer.eos_token_id
    forwards = []

    def end_every_row(module, inputs, output):  # every row ends at its first token
        forwards.append(1)
        output.logits[..., eos] = 1e4
        return output

    student.register_forward_hook(end_every_row)
    examples = graph_task.examples("eval", 2)
    sampler = TeacherMixedRollout(student, teacher, tokenizer, 0.0)

    sampler.generate(examples, 5, greedy=True)
    assert len(forwards) == 1  # alone: stops when its rows are done

    def all_reduce(flag):  # the other process decodes until this one has run 4 steps
        flag += 1.0 if len(forwards) < 4 else 0.0

    monkeypatch.setattr(rollout_hf, "synced_generation", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    forwards.clear()
    batch = sampler.generate(examples, 5, greedy=True)
    assert len(forwards) == 4
    assert batch.response_ids.tolist() == [[eos], [eos]]
    assert batch.response_mask.tolist() == [[1], [1]]


def test_checkpoints_of_a_sharded_copy_of_the_student_are_refused(tmp_path):
    """A teacher network that copied the sharded student (DTensor parameters) cannot be saved."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    plain = torch.nn.Linear(2, 2)
    check_checkpointing(fsdp, 1, {"ema": plain})
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Linear(2, 2)
        sharded.weight = torch.nn.Parameter(distribute_tensor(sharded.weight, mesh, [Shard(0)]))
        with pytest.raises(OpdistillError, match="network 'ema' is a sharded copy"):
            check_checkpointing(fsdp, 1, {"ema": sharded})
        check_checkpointing(fsdp, 0, {"ema": sharded})  # no checkpoints: nothing to refuse
        ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
        check_checkpointing(ddp, 1, {"ema": sharded})
    finally:
        torch.distributed.destroy_process_group()
