import dataclasses
import json
import re
from pathlib import Path

import pytest

from opdistill.cli import main
from opdistill.errors import OpdistillError
from opdistill.experiments.demo import (
    CHAIN,
    ENGINES,
    GRAPH,
    METHODS,
    OBJECTIVES,
    README_END,
    README_START,
    SUITES,
    DemoSettings,
    _cache_name,
    models_fingerprint,
    slug,
    suite_settings,
    update_readme_results,
)
from opdistill.experiments.self_distill import SelfDistillSettings, methods


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    """The whole demo pipeline at smoke-test size: prepare, every method, table, JSON and plot."""
    out, cache = tmp_path / "demo", tmp_path / "cache"
    args = ["demo", "--quick", "--seeds", "2", "--output-dir", str(out), "--cache-dir", str(cache)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "GKD on-policy (λ=1, RKL)" in printed
    assert "distinct correct" not in printed  # the chain task has one answer per prompt
    assert "on 256 labelled prompts" in printed and "on 500 labelled prompts" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"teacher", "initial student", *METHODS}
    assert all(len(results["per_seed"][m]) == 2 for m in METHODS)
    assert (out / "pass_at_k.png").stat().st_size > 1000
    # A second run reuses the cached teacher and student.
    assert main([*args[:3], "1", *args[4:]]) == 0
    assert "using the cached teacher" in capsys.readouterr().out


@pytest.mark.parametrize("quick", [False, True])
def test_engines_suite_fits_vllm_and_keeps_its_own_cache(quick):
    """vLLM on CPU needs attention heads of 32 dimensions or more; the suite's other student
    must not overwrite the default suite's cached one."""
    size = suite_settings("engines", quick).student_size
    hidden, _, heads = size
    assert hidden // heads >= 32 and hidden % heads == 0
    assert suite_settings("default", quick).student_size != size
    assert _cache_name(GRAPH, quick, "engines") != _cache_name(GRAPH, quick)
    assert {m["rollout"]["backend"] for m in ENGINES.values()} == {"hf", "hf_static", "vllm"}


@pytest.mark.slow
def test_quick_engines_suite(tmp_path):
    """The engines suite at smoke-test size, every arm (vLLM ones included) trained."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here: `make vllm` builds .venv-vllm, where CI runs this")
    out = tmp_path / "suite"
    args = ["demo", "--suite", "engines", "--quick", "--seeds", "1", "--output-dir", str(out)]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"teacher", "initial student", *ENGINES}
    assert (tmp_path / "cache" / "demo-engines-quick" / "COMPLETE").exists()


@pytest.mark.slow
def test_quick_objectives_suite(tmp_path, capsys):
    """Every objective on both tasks, at smoke-test size."""
    out = tmp_path / "suite"
    args = [
        "demo",
        "--suite",
        "objectives",
        "--quick",
        "--seeds",
        "1",
        "--output-dir",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    for task in ("graph", "arithmetic"):
        assert all(f"{task} · {m}" in results["summary"] for m in OBJECTIVES)
        assert (out / f"pass_at_k_{task}.png").exists()
    assert "s/step" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_self_distill_suite(tmp_path, capsys):
    """Base student, every method, in- and out-of-distribution evaluation, table and plots."""
    out = tmp_path / "suite"
    args = ["demo", "--suite", "self-distill", "--quick", "--seeds", "1"]
    assert main([*args, "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    names = {"teacher", "base student", *methods(SelfDistillSettings.quick())}
    assert set(results["summary"]) == names
    assert results["ood_prompts"] > 0
    for name in names:
        metrics = results["per_seed"][name][0]
        assert {"pass@1", "pass@4", "ood pass@1", "ood pass@4", "self_bleu"} <= set(metrics)
    for plot in ("pass_at_k.png", "pass_at_k_ood.png"):
        assert (out / plot).stat().st_size > 1000
    assert "| self-distill, uniform distinct demo |" in capsys.readouterr().out


README = Path(__file__).resolve().parents[2] / "README.md"


def method_config_rows(text):
    """The rows of the README's `| method | config | example |` table."""
    lines = text.splitlines()
    start = lines.index("| method | config | example |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_method_row_of_the_readme_names_an_existing_example():
    root = README.parent
    rows = method_config_rows(README.read_text(encoding="utf-8"))
    assert len(rows) >= 10
    for row in rows:
        assert len(row) == 3, row
        paths = re.findall(r"`(examples/[^`]+\.yaml)`", row[2])
        assert paths, f"row {row[0]!r} names no example file"
        for path in paths:
            assert list(root.glob(path)), f"row {row[0]!r}: {path} does not exist"


def test_updating_the_readme_touches_only_the_marked_table(tmp_path):
    """Rows of other tables named like the demo's methods (SFT, SeqKD) stay as they are."""
    readme = tmp_path / "README.md"
    original = README.read_text(encoding="utf-8")
    readme.write_text(original, encoding="utf-8")
    table = "| method | accuracy |\n|---|---:|\n| SFT | 0.123 ± 0.001 |\n| SeqKD | 0.456 |\n"
    update_readme_results(readme, table)
    updated = readme.read_text(encoding="utf-8")
    assert method_config_rows(updated) == method_config_rows(original)
    marked = updated.split(f"\n{README_START}\n")[1].split(f"\n{README_END}\n")[0]
    assert marked + "\n" == table
    head = original.split(f"\n{README_START}\n")[0]
    tail = original.split(f"\n{README_END}\n")[1]
    assert updated.startswith(head) and updated.endswith(tail)
    update_readme_results(readme, table)  # idempotent
    assert readme.read_text(encoding="utf-8") == updated


def test_a_readme_without_markers_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("| SFT | `nll` | `examples/sft.yaml` |\n", encoding="utf-8")
    with pytest.raises(OpdistillError, match="demo-results:start"):
        update_readme_results(readme, "| SFT | 1.0 |\n")
    assert readme.read_text(encoding="utf-8") == "| SFT | `nll` | `examples/sft.yaml` |\n"


def test_self_distill_only_that_matches_no_method_is_a_one_line_error(tmp_path, capsys):
    from opdistill.cli import main

    code = main(
        [
            "demo",
            "--suite",
            "self-distill-frontier",
            "--quick",
            "--only",
            "nothing-like-it",
            "--output-dir",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--only nothing-like-it: no method matches" in err[0] and "SDSD" in err[0]
    assert not (tmp_path / "cache").exists()  # stopped before building anything


def test_the_gkd_grid_is_the_papers_comparison():
    """SFT, SeqKD, and every divergence at λ = 0, 0.5 and 1; λ = 0 with FKL is supervised KD."""
    grid = SUITES["gkd"][1]
    assert len(grid) == 2 + 3 * 5
    fractions = sorted({m["train"]["student_data_fraction"] for m in grid.values()})
    assert fractions == [0.0, 0.5, 1.0]
    assert grid["GKD λ=0 FKL"] == METHODS["supervised KD (λ=0, FKL)"]
    assert grid["GKD λ=1 JSD 0.9"] == METHODS["GKD on-policy (λ=1, JSD 0.9)"]
    assert {m["loss"].get("beta") for m in grid.values() if m["loss"]["kind"] == "jsd"} == {
        0.1,
        0.5,
        0.9,
    }


def test_learning_rates_go_by_method_family():
    settings = dataclasses.replace(DemoSettings(), method_lr=1e-4, on_policy_lr=2e-3)
    assert settings.lr(METHODS["SFT"]) == 1e-4
    assert settings.lr(METHODS["GKD mixed (λ=0.5, JSD 0.9)"]) == 2e-3
    assert settings.lr(METHODS["GKD on-policy (λ=1, RKL)"]) == 2e-3
    assert dataclasses.replace(settings, on_policy_lr=None).lr(METHODS["SeqKD"]) == 1e-4


def test_run_settings_leave_the_cached_models_alone():
    """A learning-rate sweep or learning curves reuse the cached teacher and student; other
    sizes rebuild them."""
    base = DemoSettings()
    runs = dataclasses.replace(base, method_lr=1e-3, on_policy_lr=1e-3, eval_every=5)
    assert models_fingerprint(CHAIN, runs) == models_fingerprint(CHAIN, base)
    assert models_fingerprint(CHAIN, dataclasses.replace(base, student_size=(64, 2, 4))) != (
        models_fingerprint(CHAIN, base)
    )
    assert models_fingerprint(GRAPH, base) != models_fingerprint(CHAIN, base)


@pytest.mark.slow
def test_quick_gkd_suite_draws_learning_curves(tmp_path):
    out, cache = tmp_path / "suite", tmp_path / "cache"
    args = ["demo", "--suite", "gkd", "--quick", "--seeds", "2", "--output-dir", str(out)]
    only = ["--only", "SFT", "GKD λ=1 RKL", "--eval-every", "1", "--on-policy-lr", "1e-3"]
    assert main([*args, "--cache-dir", str(cache), *only]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["SFT", "GKD λ=1 RKL"]
    assert results["settings"]["on_policy_lr"] == 1e-3 and results["settings"]["eval_every"] == 1
    records = [
        json.loads(line)
        for line in (out / "runs/chain" / f"{slug('GKD λ=1 RKL')}-seed1" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert [r["step"] for r in records if r["split"] == "eval"] == [1, 2, 3]
    for metric in ("accuracy", "pass_at_1"):
        for x in ("step", "seconds"):
            assert (out / f"curve_chain_{metric}_{x}.png").stat().st_size > 1000


def test_demo_only_that_matches_no_method_is_a_one_line_error(tmp_path, capsys):
    args = ["demo", "--suite", "gkd", "--quick", "--only", "nothing like this"]
    assert main([*args, "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no method of the gkd suite matches" in err and len(err.splitlines()) == 1


def test_one_learning_rate_overrides_both_tuned_family_rates():
    tuned = suite_settings("default", False)
    assert (tuned.method_lr, tuned.on_policy_lr) == (6e-3, 3e-3)
    shared = suite_settings("default", False, method_lr=5e-4, on_policy_lr=None)
    assert (shared.method_lr, shared.on_policy_lr) == (5e-4, 5e-4)
    split = suite_settings("gkd", False, method_lr=1e-3, on_policy_lr=2e-3)
    assert (split.method_lr, split.on_policy_lr, split.eval_every) == (1e-3, 2e-3, 50)
    with pytest.raises(OpdistillError, match="teacher_lr"):
        suite_settings("default", False, teacher_lr=1.0)
