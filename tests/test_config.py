import contextlib
import dataclasses
import re
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opdistill.config import Config, config_from_dict, config_to_dict, load_config
from opdistill.errors import OpdistillError

MINIMAL = {"model": {"student": "s", "teacher": "t"}}
BASE = "model: {student: s, teacher: t}\n"
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused across examples: fine


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_maps_onto_typed_sections(tmp_path):
    path = write(
        tmp_path,
        """
model: {student: s, teacher: t}
data: {task: graph, task_args: {num_nodes: 10}}
loss: {kind: jsd, beta: 0.9}
train: {steps: 5, lr: 1, student_data_fraction: 0.5}
eval: {ks: [1, 2], num_samples: 2}
""",
    )
    config = load_config(path)
    assert config.loss.beta == 0.9 and config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.data.task_args == {"num_nodes": 10}
    assert config_from_dict(config_to_dict(config)) == config


def test_overrides_apply_after_the_file(tmp_path):
    path = write(tmp_path, "model: {student: s, teacher: t}\ntrain: {steps: 5}\n")
    config = load_config(path, ["train.steps=7", "loss.kind=forward_kl", "train.lr=3e-4"])
    assert config.train.steps == 7 and config.loss.kind == "forward_kl"
    assert config.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {student: s}\ntrain: {stepz: 3}", r"unknown key 'train.stepz'"),
        ("model: {student: s}\nwhat: 1", r"unknown key 'what'"),
        ("model: {student: s}\ntrain: {steps: three}", r"train.steps: expected an integer"),
        ("model: {student: s}\ntrain: {steps: 2.5}", r"train.steps: expected an integer"),
        ("model: {student: s}\ntrain: {progress: 1}", r"train.progress: expected true or false"),
        ("model: {student: s}\nloss: {kind: kl}", r"loss.kind: 'kl' is not one of"),
        ("model: {student: s}\neval: {ks: 4}", r"eval.ks: expected a list"),
        ("model: {student: s}\ntrain: 3", r"train: expected a mapping"),
        (
            "model: {student: s, teacher: t}\ntrain: {student_data_fraction: 1.5}",
            r"student_data_fraction must be in \[0, 1\]",
        ),
        (
            "model: {student: s, teacher: t}\nloss: {kind: jsd, beta: 1.0}",
            r"beta=1.0: jsd needs beta in \(0, 1\).*forward_kl or reverse_kl",
        ),
        (
            "model: {student: s, teacher: t}\ntrain: {max_new_tokens: 0}",
            r"max_new_tokens must be >= 1",
        ),
        ("model: {student: s}\nloss: {kind: reverse_kl}", r"model.teacher is required"),
        ("loss: {kind: nll}", r"model.student is required"),
        ("model: {student: s, teacher: t}\neval: {ks: [32], num_samples: 16}", r"eval.ks"),
        (
            "model: {student: s, teacher: t}\nloss: {minillm: {teacher_mixx: 0.2}}",
            r"unknown key 'loss\.minillm\.teacher_mixx'",
        ),
        (
            "model: {student: s, teacher: t}\nloss: {tip: {mode: all}}",
            r"loss\.tip\.mode: 'all' is not one of",
        ),
        (
            "model: {student: s, teacher: t}\nreward: {distill_weight: 2}",
            r"reward\.distill_weight must be in \[0, 1\]",
        ),
        (
            "model: {student: s, teacher: t}\nloss: {kind: minillm, minillm: {teacher_mix: 1.0}}",
            r"teacher_mix must be in \[0, 1\)",
        ),
        ("model: {student: s, teacher: t}\nloss: {kind: vopd, top_k: -1}", r"loss\.top_k"),
        (BASE + "loss: {teacher_top_k: -1}", r"loss\.teacher_top_k must be >= 0"),
        (BASE + "loss: {chunk_size: -1}", r"loss\.chunk_size must be >= 0"),
        ("model: {student: s, teacher: t, teacher_timeout: 0}", r"model\.teacher_timeout must"),
        ("model: {student: s, teacher: t, teacher_timeout: .nan}", r"teacher_timeout: expected"),
        (
            BASE + "loss: {kind: taid, teacher_top_k: 8}",
            r"loss\.teacher_top_k=8 works with loss\.kind in forward_kl.*sampled_token; "
            r"loss\.kind='taid' needs the teacher's full logits",
        ),
        (
            BASE + "loss: {kind: vopd, teacher_top_k: 8}\ntrain: {student_data_fraction: 1}",
            r"loss\.kind='vopd' needs the teacher's full logits",
        ),
        (
            BASE + "loss: {kind: jsd, teacher_top_k: 8, tip: {mode: weighted}}",
            r"loss\.teacher_top_k=8 cannot be combined with loss\.tip\.mode='weighted'",
        ),
        (
            BASE + "loss: {teacher_top_k: 8}\nreward: {distill_weight: 0.5}\n"
            "train: {student_data_fraction: 1}",
            r"loss\.teacher_top_k=8 cannot be combined with a reward \(reward\.distill_weight=0\.5",
        ),
        (
            "model: {student: s}\nloss: {teacher_top_k: 8}\nself_distill: {enabled: true}",
            r"loss\.teacher_top_k=8 cannot be combined with self_distill\.enabled",
        ),
        (
            "model: {student: s, teacher: t}\ndata: {eval_size: 0}\n"
            "train: {adaptive_source: {enabled: true}}",
            r"needs a validation loss",
        ),
        (
            "model: {student: s, teacher: t}\nloss: {kind: taid, taid: {t_start: 1.5}}",
            r"loss\.taid\.t_start",
        ),
        (
            "model: {student: s, teacher: t}\ntrain: {keep_checkpoints: -1}",
            r"train\.keep_checkpoints must be >= 0",
        ),
        (
            "model: {student: s, teacher: t}\ntrain: {on_nonfinite: ignore}",
            r"train\.on_nonfinite: 'ignore' is not one of",
        ),
        (BASE + "train: {student_data_fraction: -0.1}", r"train\.student_data_fraction must be"),
        (BASE + "loss: {kind: jsd, beta: 0}", r"loss\.beta=0\.0: jsd needs beta in \(0, 1\)"),
        (BASE + "loss: {kind: skew_forward_kl, alpha: 1}", r"loss\.alpha=1\.0: skew divergences"),
        (BASE + "loss: {kind: skew_reverse_kl, alpha: -0.5}", r"loss\.alpha=-0\.5: skew"),
        (BASE + "eval: {max_new_tokens: 0}", r"eval\.max_new_tokens must be >= 1"),
        (BASE + "eval: {backend: sglang}", r"eval\.backend: 'sglang' is not one of"),
        (
            BASE + "rollout: {server: 'http://h:8000'}",
            r"rollout\.server='http://h:8000' is a vLLM server: set rollout\.backend=vllm",
        ),
        (
            BASE + "rollout: {backend: vllm, server: 'h:8000'}",
            r"rollout\.server='h:8000' must start with http:// or https://",
        ),
        (BASE + "rollout: {server_timeout: 0}", r"rollout\.server_timeout must be > 0"),
        (BASE + "rollout: {vllm_kv_cache_gib: -1}", r"rollout\.vllm_kv_cache_gib must be >= 0"),
        (BASE + "train: {max_new_tokens: -3}", r"train\.max_new_tokens must be >= 1"),
        (BASE + "train: {steps: -1}", r"train\.steps must be >= 0"),
        (BASE + "train: {batch_size: 0}", r"train\.batch_size must be >= 1"),
        (BASE + "train: {grad_accum: 0}", r"train\.grad_accum must be >= 1"),
        (BASE + "train: {lr: 0}", r"train\.lr must be > 0"),
        (BASE + "train: {lr: -1e-4}", r"train\.lr must be > 0"),
        (BASE + "train: {lr: .nan}", r"train\.lr: expected a finite number, got nan"),
        (BASE + "train: {student_data_fraction: .inf}", r"student_data_fraction: expected a fin"),
        (BASE + "train: {temperature: 0}", r"train\.temperature \(sampling\) must be > 0"),
        (BASE + "eval: {temperature: 0}", r"eval\.temperature must be > 0"),
        (BASE + "loss: {temperature: 0}", r"loss\.temperature must be > 0"),
        (BASE + "eval: {ks: [1, 32], num_samples: 16}", r"eval\.ks: k=32 must lie in \[1, eval"),
        (BASE + "eval: {ks: [0, 1]}", r"eval\.ks: k=0 must lie in"),
        (
            BASE + "reward: {group_size: 3}\ntrain: {batch_size: 16}",
            r"train\.batch_size=16 must be a multiple of reward\.group_size=3",
        ),
        (BASE + "train: {weight_decay: -0.1}", r"train\.weight_decay must be >= 0"),
        (BASE + "data: {train_size: -1}", r"data\.train_size must be >= 0"),
        (BASE + "data: {eval_size: -1}", r"data\.eval_size must be >= 0"),
        (BASE + "eval: {num_prompts: -1}", r"eval\.num_prompts must be >= 0"),
        (BASE + "loss: {tip: {entropy_power: -1}}", r"loss\.tip\.entropy_power and divergence"),
        (BASE + "loss: {tip: {divergence_threshold: 2}}", r"loss\.tip\.entropy_threshold and"),
        (BASE + "model: {student: 3}", r":2: duplicate key 'model'"),
        (BASE + "loss: {kind: jsd, kind: nll}", r":2: duplicate key 'kind'"),
        ("model: {student: 3}", r"model\.student: expected a string, got 3"),
        ("model: {student: s}\ntrain: [1, 2]", r"train: expected a mapping, got \[1, 2\]"),
    ],
)
def test_bad_configs_name_the_key_and_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(OpdistillError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"model:\n  student: s\ntrain: {steps: [\n", r":4: expected the node content"),
        (b"model: {student: s\n  teacher: t\n", r":2: expected ',' or '}'"),
        (b"model:\n\tstudent: s\n", r":2: found character '\\t'"),
        (b"model: {student: s}\ntrain: {output_dir: \xff}\n", r":2: not valid UTF-8"),
        (b"model: {student: s}\n\x00\n", r":2: character '\\x00' is not allowed in YAML"),
        (b"model: {student: s}\ndata: {seed: !!int x}\n", r":2: cannot read 'x' as int"),
        (b"model: {student: s}\nx: 2001-13-01\n", r":2: cannot read '2001-13-01' as timestamp"),
        (b"[" * 3000, r": invalid YAML \(nested too deeply\)"),
        (b"- model\n- train\n", r": expected a mapping of sections at the top level"),
        (b"just text\n", r": expected a mapping of sections at the top level"),
    ],
)
def test_unreadable_yaml_names_the_file_and_line(tmp_path, data, message):
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    with pytest.raises(OpdistillError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(str(path)) and re.search(message, text) and "\n" not in text


def test_missing_config_file(tmp_path):
    with pytest.raises(OpdistillError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(OpdistillError, match=r"config file '.*' is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps", r"--set 'train\.steps': expected key=value"),
        ("train.nope=1", r"--set 'train\.nope=1': unknown key 'train\.nope' \(valid: .*steps"),
        ("nope.x=1", r"--set 'nope\.x=1': unknown key 'nope'"),
        ("=1", r"--set '=1': unknown key ''"),
        ("train.steps.x=1", r"--set 'train\.steps\.x=1': 'train\.steps' is not a section"),
        ("train.steps=abc", r"--set 'train\.steps=abc': train\.steps: expected an integer"),
        ("train=1", r"--set 'train=1': train: expected a mapping"),
        ("loss.kind=kl", r"--set 'loss\.kind=kl': loss\.kind: 'kl' is not one of"),
        ("data.task_args=1", r"--set 'data\.task_args=1': data\.task_args: expected a mapping"),
    ],
)
def test_bad_overrides_name_the_set_item(tmp_path, override, message):
    path = write(tmp_path, BASE)
    with pytest.raises(OpdistillError, match=message) as info:
        load_config(path, [override])
    assert "\n" not in str(info.value)


def test_overrides_into_free_form_options(tmp_path):
    config = load_config(write(tmp_path, BASE), ["data.task_args.num_nodes=9"])
    assert config.data.task_args == {"num_nodes": 9}


def test_defaults_are_valid():
    config = config_from_dict(MINIMAL)
    assert isinstance(config, Config) and config.loss.reduction == "token"


@pytest.mark.parametrize("kind", ["forward_kl", "skew_reverse_kl", "sampled_token"])
def test_top_k_teacher_configs_load(kind):
    loss = {"kind": kind, "teacher_top_k": 20, "chunk_size": 64}
    config = config_from_dict({**MINIMAL, "loss": loss, "train": {"student_data_fraction": 1}})
    assert config.loss.teacher_top_k == 20 and config.loss.chunk_size == 64


def field_names(cls: type) -> set[str]:
    """Every key name of a config section, nested sections included."""
    names = set()
    for name, tp in typing.get_type_hints(cls).items():
        names |= {name} | (field_names(tp) if dataclasses.is_dataclass(tp) else set())
    return names


FIELD_NAMES = sorted(field_names(Config))
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "data", "loss", "train", "eval", "x"]), yaml_values, max_size=4
    )
)
def test_config_parser_never_crashes_with_anything_else(values):
    with contextlib.suppress(OpdistillError):
        config_from_dict(values)


YAML_PIECES = [
    *"{}[]:,-?&*!|>'\"#%@`.=\n\t ",
    *("!!int ", "!!timestamp ", "<<: ", "\x00", ".nan", "1e9"),
    *("model", "student", "teacher", "train", "steps", "lr", "loss", "kind", "x"),
]
yaml_like_text = st.lists(
    st.sampled_from(YAML_PIECES) | st.text(max_size=3),
    max_size=30,
).map("".join)


def check_load_config(path, overrides=()):
    """load_config returns a Config or raises a one-line OpdistillError naming the file."""
    try:
        config = load_config(path, list(overrides))
    except OpdistillError as error:
        assert "\n" not in str(error)
        assert str(path) in str(error) or str(error).startswith("--set")
    else:
        assert isinstance(config, Config)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=st.text() | yaml_like_text)
def test_arbitrary_config_text_loads_or_raises_opdistill_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_load_config(path)


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.binary(max_size=200))
def test_arbitrary_config_bytes_load_or_raise_opdistill_error(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(BASE.encode() + data)
    check_load_config(path)


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(overrides=st.lists(st.text(max_size=12) | yaml_like_text, max_size=3))
def test_arbitrary_overrides_apply_or_raise_opdistill_error(tmp_path, overrides):
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    check_load_config(path, overrides)


SELF_DISTILL = "model: {student: s}\ntrain: {student_data_fraction: 1}\n"


def test_the_diverse_preset_fills_only_the_keys_not_given(tmp_path):
    from opdistill.config import SELF_DISTILL_PRESETS

    preset = SELF_DISTILL_PRESETS["diverse"]
    config = load_config(
        write(tmp_path, SELF_DISTILL + "self_distill: {enabled: true, preset: diverse}")
    )
    for key, value in preset.items():
        assert getattr(config.self_distill, key) == value
    given = SELF_DISTILL + "self_distill: {enabled: true, preset: diverse, demo_attempts: 3}"
    config = load_config(write(tmp_path, given))
    assert config.self_distill.demo_attempts == 3
    assert config.self_distill.anchor_weight == preset["anchor_weight"] > 0
    override = load_config(
        write(tmp_path, SELF_DISTILL + "self_distill: {enabled: true, preset: diverse}"),
        ["self_distill.anchor_weight=0.25"],
    )
    assert override.self_distill.anchor_weight == 0.25


@pytest.mark.parametrize(
    "section, message",
    [
        ("{enabled: true, preset: wide}", r"self_distill\.preset: 'wide' is not one of"),
        ("{enabled: true, demo_model: ema}", r"demo_model='ema' samples demonstrations"),
        ("{enabled: true, context_strength: -1}", r"self_distill\.context_strength"),
        ("{enabled: true, anchor_weight: -0.5}", r"self_distill\.anchor_weight"),
        ("{enabled: true, anchor_kind: l2}", r"self_distill\.anchor_kind: 'l2' is not one of"),
        (
            "{enabled: true, context: demonstration, demo_model: ema, demo_ema_decay: 1}",
            r"self_distill\.demo_ema_decay must be in \[0, 1\)",
        ),
    ],
)
def test_bad_diversity_options_name_the_key(tmp_path, section, message):
    with pytest.raises(OpdistillError, match=message):
        load_config(write(tmp_path, SELF_DISTILL + f"self_distill: {section}"))
