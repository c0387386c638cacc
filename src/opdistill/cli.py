"""The command line: `opdistill train`, `eval`, `demo`, `plot`, `diagnose`, `experiment`,
`cache-teacher` and `serve-teacher`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from opdistill.errors import OpdistillError
from opdistill.files import writable, write_atomic


def _train(args: argparse.Namespace) -> None:
    from opdistill.config import load_config
    from opdistill.models.loading import check_model_paths
    from opdistill.run_dir import (
        RunLock,
        check_output_dir,
        clear,
        config_inputs,
        contents,
        resume_changes,
    )
    from opdistill.trainer import build_trainer

    if args.resume and args.overwrite:
        raise OpdistillError("--resume and --overwrite exclude each other: pass one of them")
    config = load_config(args.config, args.set)
    output = Path(config.train.output_dir)
    check_output_dir(output, args.resume, args.overwrite, config_inputs(config, args.config))
    if args.resume and contents(output):
        resume_changes(output, config)  # refuses changed run-defining keys before models load
    check_model_paths(config.model.student, config.model.teacher, config.model.tokenizer)
    is_main = os.environ.get("RANK", "0") == "0"
    created = not output.exists()
    lock = RunLock(output)
    if is_main:
        lock.acquire()  # a second run on this directory stops here, naming this one's PID
    try:
        trainer = build_trainer(config)  # loads and checks every input before the old run goes
        if args.overwrite and is_main:
            clear(output)
        trainer.accelerator.wait_for_everyone()  # nothing is written before the old run is gone
        metrics = trainer.train(resume=args.resume)
    except BaseException:
        if is_main and created and not contents(output):  # nothing written: leave no trace
            lock.release()
            shutil.rmtree(output, ignore_errors=True)
        raise
    finally:
        if is_main:
            lock.release()
    if metrics and trainer.accelerator.is_main_process:
        print(json.dumps(metrics, indent=2))


def _eval(args: argparse.Namespace) -> None:
    from opdistill.config import is_served_teacher, load_config
    from opdistill.eval.evaluate import evaluate_with_config
    from opdistill.eval.monitor import check_golden
    from opdistill.models.loading import (
        check_model_paths,
        check_tokenizers_match,
        check_vocabulary,
        load_model,
        load_tokenizer,
    )
    from opdistill.prompts import context_window, fit_split
    from opdistill.tasks import make_task
    from opdistill.teachers import model_teacher, served_teacher

    overrides = list(args.set)
    if args.model:
        overrides.append(f"model.student={args.model}")
    config = load_config(args.config, overrides)
    mc, dc, ec = config.model, config.data, config.eval
    if args.output:
        _check_output_file(Path(args.output).expanduser())
    use_teacher = bool(mc.teacher) and not args.no_teacher
    served = use_teacher and is_served_teacher(mc.teacher)
    check_model_paths(mc.student, mc.teacher if use_teacher else None, mc.tokenizer)
    task = make_task(dc.task, **dc.task_args)  # cheap checks first, before loading weights
    check_golden(ec, task)
    examples = task.examples("eval", ec.num_prompts, seed=dc.seed)
    tokenizer = load_tokenizer(mc.tokenizer or mc.student)
    teacher, teacher_model = None, None
    if served:
        teacher = served_teacher(mc.teacher, tokenizer, mc.teacher_token_env, mc.teacher_timeout)
    elif use_teacher:
        check_tokenizers_match(load_tokenizer(mc.teacher), tokenizer)
    model = load_model(mc.student, mc.dtype)
    check_vocabulary(model, tokenizer, "model.student")
    if use_teacher and not served:
        teacher_model = load_model(mc.teacher, mc.dtype)
        check_vocabulary(teacher_model, tokenizer, "model.teacher")
        teacher = model_teacher(teacher_model, len(tokenizer))
    window = context_window(model, teacher_model)
    if served and teacher.context_window:
        window = min(window or teacher.context_window, teacher.context_window)
    fit = fit_split(dc, tokenizer, window, examples, "eval", ec.max_new_tokens)
    if fit.too_long:
        print(f"opdistill: {fit.summary('eval')}", file=sys.stderr)
    examples = fit.examples
    rollout = None
    if ec.backend == "vllm":  # an engine on the model, or the server at rollout.server
        from opdistill.rollout import vllm_rollout

        rollout = vllm_rollout(config, model, tokenizer)
    metrics = evaluate_with_config(
        model, tokenizer, task, examples, ec, teacher, seed=dc.seed, rollout=rollout
    )
    if rollout is not None:
        rollout.close()  # the engine's memory, or the server connection
    text = json.dumps(metrics, indent=2)
    print(text)  # first: the metrics are not lost if the file cannot be written after all
    if args.output:
        output = Path(args.output).expanduser()
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(output, text + "\n")
        except OSError as error:
            raise OpdistillError(
                f"--output {args.output!r}: cannot write ({error.strerror or error}); the "
                "metrics are printed above"
            ) from None


def _check_output_file(path: Path) -> None:
    """Refuse, before any model loads, an --output file that cannot be written."""
    if path.is_dir():
        raise OpdistillError(f"--output {str(path)!r} is a directory; give a file name")
    if not writable(path.absolute().parent):
        raise OpdistillError(f"--output {str(path)!r} is not writable")


def _cache_teacher(args: argparse.Namespace) -> None:
    from opdistill.config import load_config
    from opdistill.models.loading import check_model_paths
    from opdistill.teachers.cache_writer import write_teacher_cache

    config = load_config(args.config, args.set)
    output = args.output or config.model.teacher_cache
    if not output:
        raise OpdistillError("cache-teacher needs --output DIR (or model.teacher_cache)")
    teacher = args.teacher or config.model.teacher
    if not teacher:
        raise OpdistillError("cache-teacher needs a teacher: set model.teacher or pass --teacher")
    check_model_paths(config.model.student, teacher, config.model.tokenizer)
    temperature = config.loss.temperature if args.temperature is None else args.temperature
    report = write_teacher_cache(
        config,
        output,
        args.top_k,
        batch_size=args.batch_size,
        temperature=temperature,
        examples_per_shard=args.examples_per_shard,
        teacher=teacher,
    )
    print(f"opdistill: {report.summary()}")


def _serve_teacher(args: argparse.Namespace) -> None:
    from opdistill.models.loading import load_model, load_tokenizer
    from opdistill.models.tokenizers import tokenizer_fingerprint

    try:
        from opdistill.teachers.server import is_loopback, serve_teacher
    except ImportError as error:
        raise OpdistillError(
            f"serve-teacher needs {error.name or 'starlette and uvicorn'}: "
            "pip install 'opdistill[serve]'"
        ) from None
    if not 0 <= args.port <= 65535:
        raise OpdistillError(f"--port {args.port}: must be in [0, 65535]")
    if not 0 < args.max_request_mb < float("inf") or args.max_batch_tokens < 1:
        raise OpdistillError("--max-request-mb must be > 0 and --max-batch-tokens >= 1")
    token = os.environ.get(args.token_env) or None
    if token is None and not is_loopback(args.host):
        print(
            f"opdistill: warning: serving on {args.host} without a token: anyone who can reach "
            f"port {args.port} can use the teacher (set ${args.token_env})",
            file=sys.stderr,
        )
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, args.dtype)
    if args.device:
        import torch

        try:
            model.to(torch.device(args.device))
        except (RuntimeError, ValueError, AssertionError) as error:
            raise OpdistillError(f"--device {args.device!r}: {error}") from None
    serve_teacher(
        model,
        len(tokenizer),
        host=args.host,
        port=args.port,
        token=token,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_batch_tokens=args.max_batch_tokens,
        model_name=args.model,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


def _demo(args: argparse.Namespace) -> None:
    from opdistill.experiments.demo import default_cache_dir, run_demo, update_readme_results

    output_dir = args.output_dir or (
        "runs/demo" if args.suite == "default" else f"runs/demo-{args.suite}"
    )
    if args.suite in ("self-distill", "self-distill-frontier"):
        from opdistill.experiments.self_distill import run_self_distill_suite

        cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        run_self_distill_suite(
            Path(output_dir),
            cache,
            args.seeds,
            args.steps,
            args.quick,
            frontier=args.suite == "self-distill-frontier",
            only=args.only,
            reuse=args.reuse_runs,
        )
        return
    if args.suite == "multi-teacher":
        from opdistill.experiments.multi_teacher import run_multi_teacher_suite

        cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        run_multi_teacher_suite(Path(output_dir), cache, args.seeds, args.steps, args.quick)
        return
    if args.suite == "cross-tokenizer":
        from opdistill.experiments.cross_tokenizer import run_cross_tokenizer_suite

        cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        run_cross_tokenizer_suite(Path(output_dir), cache, args.seeds, args.steps, args.quick)
        return
    results = run_demo(
        output_dir=Path(output_dir),
        suite=args.suite,
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
        seeds=args.seeds,
        steps=args.steps,
        prepare_only=args.prepare_only,
        quick=args.quick,
        only=tuple(args.only),
        method_lr=args.lr,
        on_policy_lr=args.on_policy_lr,
        eval_every=args.eval_every,
    )
    if args.update_readme and results:
        update_readme_results(Path(args.update_readme), results["table"])


def _plot(args: argparse.Namespace) -> None:
    from opdistill.eval.curves import X_LABELS, learning_curves
    from opdistill.eval.plots import plot_learning_curves

    run_dirs = [Path(d).expanduser() for d in args.run_dirs]
    curves = learning_curves(run_dirs, args.metric, args.x, args.split, not args.no_group)
    path = plot_learning_curves(curves, args.output, args.metric, X_LABELS[args.x], args.title)
    for name, points in curves.items():
        x, mean, std = points[-1]
        print(f"{name}: {len(points)} points, last {args.metric} {mean:.4g} ± {std:.2g} at {x:g}")
    print(f"opdistill: wrote {path}")


def _experiment(args: argparse.Namespace) -> None:
    from opdistill.experiments import run_experiment

    code = run_experiment(args.name, args.args)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opdistill", description="On-policy distillation of language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a student from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in train.output_dir",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="delete a non-empty train.output_dir first"
    )
    train.set_defaults(func=_train)

    ev = commands.add_parser("eval", help="evaluate a model on the config's task")
    ev.add_argument("config", help="YAML config file (its data and eval sections are used)")
    ev.add_argument("--model", help="model to evaluate (default: the config's model.student)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--no-teacher", action="store_true", help="skip the distance to the teacher")
    ev.add_argument("--output", help="also write the metrics as JSON to this file")
    ev.set_defaults(func=_eval)

    demo = commands.add_parser(
        "demo", help="the embedded default: distill a tiny teacher into a student on CPU"
    )
    demo.add_argument(
        "--suite",
        choices=[
            "default",
            "gkd",
            "graph",
            "objectives",
            "engines",
            "self-distill",
            "self-distill-frontier",
            "multi-teacher",
            "cross-tokenizer",
        ],
        default="default",
        help="default: the GKD family on arithmetic chains with 256 labelled prompts; gkd: "
        "GKD's grid (SFT, SeqKD, λ ∈ {0, 0.5, 1} × FKL, RKL, JSD 0.1/0.5/0.9) on that task with "
        "learning curves; graph: the GKD family on the graph task; objectives: every "
        "objective on the graph and arithmetic tasks; engines: on-policy GKD sampled by "
        "transformers, by vLLM and pipelined one step stale (from .venv-vllm); self-distill: "
        "self-distillation's diversity cost against RL and GKD, in and out of distribution; "
        "self-distill-frontier: the diversity-preserving remedies at several strengths; "
        "multi-teacher: one "
        "student from a graph and an arithmetic teacher at once; cross-tokenizer: a "
        "character-level teacher into a word-level student",
    )
    demo.add_argument(
        "--output-dir",
        default=None,
        help="default: runs/demo (runs/demo-SUITE for another suite)",
    )
    demo.add_argument(
        "--cache-dir",
        default=None,
        help="where the trained teacher and initial student are kept "
        "(default: $OPDISTILL_CACHE or ~/.cache/opdistill)",
    )
    demo.add_argument("--seeds", type=int, default=3)
    demo.add_argument(
        "--update-readme",
        metavar="PATH",
        help="write the results table into PATH between its <!-- demo-results:start --> and "
        "<!-- demo-results:end --> lines (nothing else in the file changes)",
    )
    demo.add_argument("--steps", type=int, default=None, help="steps per method")
    demo.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="TEXT",
        help="run only the methods whose names contain one of these",
    )
    demo.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of every method run (of the off-policy ones with --on-policy-lr)",
    )
    demo.add_argument(
        "--on-policy-lr",
        type=float,
        default=None,
        help="learning rate of the methods that sample from the student (λ > 0); default --lr",
    )
    demo.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="evaluate every N steps for learning curves (the gkd suite: 50)",
    )
    demo.add_argument(
        "--reuse-runs",
        action="store_true",
        help="self-distill suites: keep the runs already finished in the output directory with "
        "the same settings; several processes started alike share the remaining runs",
    )
    demo.add_argument(
        "--prepare-only",
        action="store_true",
        help="only build the tokenizer, teacher and initial student",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a smoke-test sized run (minutes → seconds); numbers not meaningful",
    )
    demo.set_defaults(func=_demo)

    plot = commands.add_parser(
        "plot",
        help="learning curves of runs (metrics.jsonl) in one PNG, mean ± std over the seeds "
        "of a method (runs named METHOD-seedN)",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    plot.add_argument("--metric", default="accuracy", help="a metric of the records")
    plot.add_argument(
        "--x",
        choices=["step", "seconds", "wall_seconds"],
        default="step",
        help="step; seconds: time in optimizer steps; wall_seconds: with evaluations",
    )
    plot.add_argument("--split", default="eval", help="which records (eval, train, ...)")
    plot.add_argument("--no-group", action="store_true", help="one line per run directory")
    plot.add_argument("--title", default=None)
    plot.add_argument("-o", "--output", default="curves.png", help="PNG file to write")
    plot.set_defaults(func=_plot)

    from opdistill.experiments import EXPERIMENTS

    experiment = commands.add_parser(
        "experiment",
        help="run a measured experiment of the docs (options after the name go to it; "
        "opdistill experiment NAME --help lists them)",
    )
    experiment.add_argument(
        "name",
        choices=sorted(EXPERIMENTS),
        help="; ".join(f"{name}: {summary}" for name, (_, summary) in sorted(EXPERIMENTS.items())),
    )
    experiment.add_argument("args", nargs=argparse.REMAINDER, help="the experiment's options")
    experiment.set_defaults(func=_experiment)

    serve = commands.add_parser(
        "serve-teacher",
        help="serve a teacher over HTTP for model.teacher: http://HOST:PORT",
    )
    serve.add_argument("model", help="teacher model: a path, hub id or gguf: spec")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine)"
    )
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument(
        "--token-env",
        default="OPDISTILL_TEACHER_TOKEN",
        help="environment variable holding the bearer token clients must send (unset: none)",
    )
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    serve.add_argument("--device", default=None, help="e.g. cuda, cuda:1 (default: cpu)")
    serve.add_argument(
        "--max-request-mb", type=float, default=16.0, help="largest request body accepted"
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="largest request, in rows × (longest prompt + longest response) tokens",
    )
    serve.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    serve.set_defaults(func=_serve_teacher)

    cache = commands.add_parser(
        "cache-teacher",
        help="score the training completions with the teacher once and store its top-k "
        "log-probs (model.teacher_cache)",
    )
    cache.add_argument("config", help="YAML config file (its model and data sections are used)")
    cache.add_argument(
        "--output", help="cache directory (default: the config's model.teacher_cache)"
    )
    cache.add_argument("--teacher", help="teacher model (default: the config's model.teacher)")
    cache.add_argument("--top-k", type=int, default=20, help="log-probs kept per token")
    cache.add_argument("--batch-size", type=int, default=16, help="examples per teacher pass")
    cache.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="temperature of the stored log-probs (default: the config's loss.temperature)",
    )
    cache.add_argument("--examples-per-shard", type=int, default=256, help="examples per file")
    cache.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cache.set_defaults(func=_cache_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars; ours is the training bar
    try:
        args.func(args)
    except OpdistillError as error:
        print(f"opdistill: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opdistill: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
