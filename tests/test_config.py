import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opdistill.config import Config, config_from_dict, config_to_dict, load_config
from opdistill.errors import OpdistillError

MINIMAL = {"model": {"student": "s", "teacher": "t"}}


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
    ],
)
def test_bad_configs_name_the_key_and_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(OpdistillError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  student: s\ntrain: {steps: [\n")
    with pytest.raises(OpdistillError, match=rf"{path.name}:\d+"):
        load_config(path)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(OpdistillError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path, "model: {student: s, teacher: t}\n")
    with pytest.raises(OpdistillError, match="expected key=value"):
        load_config(path, ["train.steps"])
    with pytest.raises(OpdistillError, match=r"unknown key 'train\.nope'"):
        load_config(path, ["train.nope=1"])


def test_defaults_are_valid():
    config = config_from_dict(MINIMAL)
    assert isinstance(config, Config) and config.loss.reduction == "token"


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
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
