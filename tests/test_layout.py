"""The architecture the package layout promises, checked on the source."""

import ast
import importlib
import inspect
import pkgutil
import typing
from pathlib import Path

import opdistill
import opdistill.teachers
from opdistill.config import LossKind
from opdistill.objectives import OBJECTIVES
from opdistill.teachers import Teacher

SOURCE = Path(opdistill.__file__).parent


def _modules(package) -> list:
    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    ]


def _concrete_teachers() -> set[str]:
    names = set()
    for module in _modules(opdistill.teachers):
        for name, value in vars(module).items():
            if inspect.isclass(value) and Teacher in value.__mro__[1:]:
                names.add(name)
    return names


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from X import name` and (X, "") of every `import X`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def test_no_module_outside_teachers_imports_a_concrete_teacher():
    concrete = _concrete_teachers()
    assert {
        "ModelTeacher",
        "PrivilegedContextTeacher",
        "RemoteTeacher",
        "CachedTeacher",
    } <= concrete
    offenders = []
    for path in SOURCE.rglob("*.py"):
        if "teachers" in path.relative_to(SOURCE).parts:
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {name}" for _, name in _imports(path) if name in concrete]
        offenders += [f"{path.name}: {name}" for name in concrete if f".{name}" in text]
    assert not offenders


def test_every_loss_kind_has_one_registered_objective():
    assert set(typing.get_args(LossKind)) == set(OBJECTIVES)
    for name, objective in OBJECTIVES.items():
        assert objective.name == name
        assert objective.teacher in (None, "logits", "topk", "token_logprobs")


PUBLIC = {
    "opdistill",
    "opdistill.batch",
    "opdistill.config",
    "opdistill.errors",
    "opdistill.eval",
    "opdistill.files",
    "opdistill.losses",
    "opdistill.models",
    "opdistill.objectives",
    "opdistill.rollout",
    "opdistill.tasks",
    "opdistill.teachers",
}


def test_experiments_and_examples_use_only_the_public_api():
    roots = [SOURCE / "experiments", SOURCE.parents[1] / "examples"]
    for path in [p for root in roots for p in root.rglob("*.py")]:
        for module, _ in _imports(path):
            if module.startswith("opdistill") and not module.startswith("opdistill.experiments"):
                assert module in PUBLIC, f"{path.name} imports {module}"


def test_the_top_level_names_resolve():
    for name in opdistill.__all__:
        assert getattr(opdistill, name) is not None, name
