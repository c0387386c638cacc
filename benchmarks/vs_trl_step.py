"""opdistill against TRL's GKDTrainer: seconds per on-policy step, peak memory, loss agreement.

Both tools train the same student (same config and initial weights) against the same teacher, on
the same prompts in the same order, with the same batch size, response budget and learning rate:
λ = 1 (every step samples from the student), JSD with β = 0.5, temperature 1, fp32 on the CPU,
TRL with bf16 and gradient checkpointing off. The tokenizer is opdistill's word-level tokenizer
(with its chat template) padded with dummy tokens to `--vocab`, the size of the models' vocabulary.

Each tool runs in its own subprocess, so the peak resident memory (ru_maxrss) is that tool's; the
warmup steps are excluded and the median seconds per step is reported. Then both losses are
computed on the same fixed batch of student and teacher logits; the script exits with status 1
when they disagree by more than 1e-5 (relative).

`--trl-trainer distillation` runs TRL's DistillationTrainer instead of GKDTrainer: always
on-policy, with a loss computed in chunks from the hidden states (TRL suggests it for λ = 1 and
temperature 1).

`--rollout hf_static|vllm` samples opdistill's rollouts with that backend (default `hf`,
transformers `generate` like TRL), `--max-staleness S` pipelines them (S steps ahead). vLLM lives
in its own environment without TRL: run the script with the main one and pass
`--worker-python .venv-vllm/bin/python` for opdistill's worker.

    python benchmarks/vs_trl_step.py [--steps 10] [--batch-size 4] [--max-new-tokens 128]
        [--vocab 49152] [--trl-trainer gkd|distillation] [--rollout hf|hf_static|vllm]
        [--max-staleness 0] [--worker-python PATH] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import Any

import common
from common import StepSetup

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
TRL_TRAINERS = {"gkd": "TRL GKDTrainer", "distillation": "TRL DistillationTrainer"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per tool")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="response budget (128)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (49152)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trl-trainer",
        choices=list(TRL_TRAINERS),
        default="gkd",
        help="TRL's trainer: gkd (GKDTrainer, default) or distillation (DistillationTrainer)",
    )
    parser.add_argument(
        "--rollout",
        choices=["hf", "hf_static", "vllm"],
        default="hf",
        help="opdistill's rollout.backend (default hf: transformers generate, like TRL)",
    )
    parser.add_argument(
        "--max-staleness", type=int, default=0, help="opdistill's train.max_staleness (0)"
    )
    parser.add_argument(
        "--worker-python",
        default=None,
        help="Python of opdistill's worker, e.g. .venv-vllm/bin/python for --rollout vllm",
    )
    common.add_common_args(parser)
    parser.add_argument("--worker", choices=["opdistill", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)  # JSON of the StepSetup
    parser.add_argument("--models", help=argparse.SUPPRESS)  # directory of save_built
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    if args.quick and args.steps == 10:
        args.steps = 2
    if args.max_staleness < 0:
        parser.error("--max-staleness must be >= 0")
    if args.max_staleness and args.rollout == "hf":
        parser.error("--max-staleness needs --rollout hf_static or vllm (seeded sampling)")
    return args


# ------------------------------------------------------------------------------------- workers
def opdistill_worker(
    setup: StepSetup,
    models: Path,
    steps: int,
    warmup: int,
    around_step: Callable[[], AbstractContextManager[Any]] = nullcontext,
    loss: dict[str, Any] | None = None,
    rollout: str = "hf",
    max_staleness: int = 0,
) -> dict[str, Any]:
    """Time `trainer.step()` of opdistill's Trainer; each step runs inside `around_step()`;
    `loss` overrides keys of the config's `loss` section; `rollout` is its rollout.backend,
    `max_staleness` its train.max_staleness."""
    built = common.load_built(models, setup)
    loaded = common.current_rss_mib()
    seconds, tokens = [], []
    prompts: list[list[list[int]]] = []
    with tempfile.TemporaryDirectory(prefix="opdistill-bench-run-") as output_dir:
        trainer = common.opdistill_trainer(
            setup,
            built,
            warmup + steps,
            output_dir,
            loss=loss,
            rollout={"backend": rollout, "vllm_gpu_memory_utilization": 0.3},
            max_staleness=max_staleness,
        )
        # Pipelined, the worker samples (on its own copy of the student, or on the engine).
        sampler = (
            trainer.pipeline.sampler if trainer.pipeline is not None else trainer.student_sampler
        )
        generate = sampler.generate

        def recording_generate(*args: Any, **kwargs: Any) -> Any:
            batch = generate(*args, **kwargs)
            prompts.append(common.prompt_rows(batch.prompt_ids, batch.prompt_mask))
            return batch

        sampler.generate = recording_generate
        for index in range(warmup + steps):
            with around_step():
                started = time.perf_counter()
                stats = trainer.step()
                elapsed = time.perf_counter() - started
            if index >= warmup:
                seconds.append(elapsed)
                tokens.append(stats.num_tokens)
        if trainer.pipeline is not None:
            trainer.pipeline.close()
    return {
        "seconds": seconds,
        "response_tokens": tokens,
        "prompts_digest": common.digest(prompts[: warmup + steps]),  # not those sampled ahead
        "rss_after_load_mib": loaded,
        "peak_rss_mib": common.peak_rss_mib(),
        "settings": (
            f"Trainer.step(); loss jsd, beta={setup.beta}, λ=1, temperature=1.0, "
            f"optim=torch.optim.AdamW (fused), fp32, rollout.backend={rollout}, "
            f"train.max_staleness={max_staleness}"
        ),
    }


def trl_worker(
    setup: StepSetup,
    models: Path,
    steps: int,
    warmup: int,
    kind: str = "gkd",
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Time the steps of TRL's GKDTrainer (`kind` "gkd") or DistillationTrainer
    ("distillation"), between consecutive `on_step_end` callbacks; `callbacks` are added to
    the trainer's."""
    from datasets import Dataset
    from transformers import TrainerCallback

    built = common.load_built(models, setup)
    total = warmup + steps
    ordered = common.prompt_order(built.examples, setup.seed, total * setup.batch_size)
    loaded = common.current_rss_mib()
    step_ends: list[float] = []
    tokens: list[int] = []
    normalisers: list[int | None] = []  # what the loss is divided by
    prompts: list[list[list[int]]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

    shared = {
        "per_device_train_batch_size": setup.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": total,
        "learning_rate": setup.lr,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "beta": setup.beta,
        "temperature": 1.0,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "activation_checkpointing": False,
        "use_cpu": True,
        "disable_dropout": True,
        "dataloader_num_workers": 0,
        "logging_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": setup.seed,
    }
    with tempfile.TemporaryDirectory(prefix="opdistill-bench-trl-") as output_dir:
        if kind == "gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            class CountingGKDTrainer(GKDTrainer):
                """Records each step's response tokens, prompts and loss normaliser."""

                def compute_loss(
                    self,
                    model: Any,
                    inputs: dict[str, Any],
                    return_outputs: bool = False,
                    num_items_in_batch: Any = None,
                ) -> Any:
                    tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
                    prompts.append(
                        common.prompt_rows(inputs["prompts"], inputs["prompt_attention_mask"])
                    )
                    normalisers.append(
                        None if num_items_in_batch is None else int(num_items_in_batch)
                    )
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

            messages = [
                [
                    {"role": "user", "content": e.prompt},
                    {"role": "assistant", "content": e.completion or ""},
                ]
                for e in ordered
            ]
            config = GKDConfig(
                output_dir=output_dir,
                lmbda=1.0,
                max_new_tokens=setup.max_new_tokens,
                train_sampling_strategy="sequential",  # the prompts in opdistill's order
                **shared,
            )
            trainer: Any = CountingGKDTrainer(
                model=built.student,
                teacher_model=built.teacher,
                args=config,
                train_dataset=Dataset.from_list([{"messages": m} for m in messages]),
                processing_class=built.tokenizer,
                callbacks=[StepClock(), *callbacks],
            )
            described = (
                f"GKDTrainer; lmbda={config.lmbda}, use_cache in generation="
                f"{trainer.generation_config.use_cache}"
            )
        else:
            from trl import DistillationConfig, DistillationTrainer

            class CountingDistillationTrainer(DistillationTrainer):
                """Records each generation's response tokens and prompts."""

                def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
                    output = super()._generate_and_score_completions(inputs)
                    tokens.append(int(output["completion_mask"].sum()))
                    prompts.append(common.prompt_rows(output["prompt_ids"], output["prompt_mask"]))
                    normalisers.append(int(output["num_items_in_batch"]))
                    return output

            config = DistillationConfig(
                output_dir=output_dir,
                max_completion_length=setup.max_new_tokens,
                shuffle_dataset=False,  # the prompts in opdistill's order
                **shared,
            )
            trainer = CountingDistillationTrainer(
                model=built.student,
                teacher_model=built.teacher,
                args=config,
                train_dataset=Dataset.from_list(
                    [{"prompt": [{"role": "user", "content": e.prompt}]} for e in ordered]
                ),
                processing_class=built.tokenizer,
                callbacks=[StepClock(), *callbacks],
            )
            described = "DistillationTrainer (on-policy, chunked loss)"
        trainer.train()
    seconds = [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:], strict=True)]
    optim = getattr(config.optim, "value", config.optim)
    return {
        "seconds": seconds,
        "response_tokens": tokens[warmup:],
        "num_items_in_batch": normalisers[warmup:],
        "prompts_digest": common.digest(prompts),
        "rss_after_load_mib": loaded,
        "peak_rss_mib": common.peak_rss_mib(),
        "settings": (
            f"{described}, beta={config.beta}, temperature={config.temperature}, "
            f"bf16={config.bf16}, gradient_checkpointing={config.gradient_checkpointing}, "
            f"optim={optim}, fp32"
        ),
    }


# ------------------------------------------------------------------------------ loss agreement
def loss_agreement(built: common.Built, setup: StepSetup) -> dict[str, Any]:
    """TRL's and opdistill's JSD (value and gradient) on one fixed batch of logits; every row is
    compared with the first (TRL's)."""
    import torch
    from trl.experimental.gkd import GKDTrainer

    from opdistill.batch import Batch, batch_logits, chat_prompt, left_pad, right_pad
    from opdistill.config import config_from_dict
    from opdistill.losses import chunked_token_divergence, token_divergence, token_mean
    from opdistill.objectives import StepInputs, per_token_loss, reduce_weighted

    tokenizer, rows, width = built.tokenizer, setup.batch_size, setup.max_new_tokens
    examples = built.examples[:rows]
    generator = torch.Generator().manual_seed(setup.seed)
    lengths = [max(1, width - row * width // (2 * rows)) for row in range(rows)]  # some padding
    responses = [
        torch.randint(0, len(tokenizer), (n,), generator=generator).tolist() for n in lengths
    ]
    prompt_ids, prompt_mask = left_pad(
        [chat_prompt(tokenizer, e.prompt) for e in examples], tokenizer.pad_token_id
    )
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id)
    batch = Batch(prompt_ids, prompt_mask, response_ids, response_mask, examples)
    with torch.no_grad():
        student_logits = batch_logits(built.student, batch, len(tokenizer))
        teacher_logits = batch_logits(built.teacher, batch, len(tokenizer))
    labels = response_ids.masked_fill(response_mask == 0, -100)
    config = config_from_dict(
        {
            "model": {"student": "(in memory)", "teacher": "(in memory)"},
            "loss": {"kind": "jsd", "beta": setup.beta, "temperature": 1.0},
        }
    )

    def trl_loss(logits: torch.Tensor) -> torch.Tensor:
        return GKDTrainer.generalized_jsd_loss(
            logits, teacher_logits, labels=labels, beta=setup.beta, temperature=1.0
        )

    def opdistill_loss(logits: torch.Tensor) -> torch.Tensor:
        per_token = per_token_loss(config, logits, teacher_logits, batch, StepInputs())
        return reduce_weighted(
            config, per_token, None, batch.response_mask, batch.num_tokens, len(examples)
        )

    def plain_loss(logits: torch.Tensor) -> torch.Tensor:
        values = token_divergence(logits, teacher_logits, "jsd", beta=setup.beta)
        return token_mean(values, batch.response_mask)

    losses = {
        "TRL generalized_jsd_loss (labels -100, batchmean)": trl_loss,
        "opdistill trainer path (per_token_loss + reduce_weighted)": opdistill_loss,
        "opdistill token_divergence + token_mean": plain_loss,
    }

    def chunked_loss(logits: torch.Tensor) -> torch.Tensor:
        values = chunked_token_divergence(logits, teacher_logits, "jsd", beta=setup.beta)
        return token_mean(values, batch.response_mask)

    losses["opdistill chunked_token_divergence + token_mean"] = chunked_loss

    results: dict[str, Any] = {"rows": [], "tokens": batch.num_tokens, "vocab": len(tokenizer)}
    reference_value, reference_grad = None, None
    ok = True
    for name, function in losses.items():
        logits = student_logits.clone().requires_grad_(True)
        loss = function(logits)
        loss.backward()
        value, grad = float(loss.detach()), logits.grad
        row: dict[str, Any] = {"name": name, "value": value}
        if reference_value is None:
            reference_value, reference_grad = value, grad
        else:
            diff = abs(value - reference_value)
            rel = diff / max(abs(reference_value), abs(value), 1e-30)
            grad_rel = float((grad - reference_grad).abs().max() / reference_grad.abs().max())
            row.update(abs_diff=diff, rel_diff=rel, grad_rel_diff=grad_rel)
            ok = ok and rel <= LOSS_RTOL and grad_rel <= GRAD_RTOL
        results["rows"].append(row)
    results["ok"] = ok
    return results


def print_agreement(agreement: dict[str, Any]) -> None:
    print(
        f"\nloss on one fixed batch ({agreement['tokens']} response tokens, vocabulary "
        f"{agreement['vocab']}; the same student and teacher logits for every row):"
    )
    rows = [
        [
            r["name"],
            f"{r['value']:.9f}",
            f"{r['abs_diff']:.2e}" if "abs_diff" in r else "–",
            f"{r['rel_diff']:.2e}" if "rel_diff" in r else "–",
            f"{r['grad_rel_diff']:.2e}" if "grad_rel_diff" in r else "–",
        ]
        for r in agreement["rows"]
    ]
    print(common.table(["loss", "value", "|diff|", "rel. diff", "grad max rel. diff"], rows))


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        common.set_threads(args.threads)
        setup = StepSetup.from_dict(json.loads(args.setup))
        if args.worker == "opdistill":
            result = opdistill_worker(
                setup,
                Path(args.models),
                args.steps,
                args.warmup,
                rollout=args.rollout,
                max_staleness=args.max_staleness,
            )
        else:
            result = trl_worker(setup, Path(args.models), args.steps, args.warmup, args.trl_trainer)
        common.write_result(args.worker_result, result)
        return 0

    setup = common.step_setup(args)
    versions = {p: version(p) for p in ("torch", "transformers", "accelerate", "trl", "opdistill")}
    print(f"opdistill vs {TRL_TRAINERS[args.trl_trainer]}, one on-policy step (CPU, fp32)")
    print("  " + ", ".join(f"{p} {v}" for p, v in versions.items()))
    print(
        f"  student: {setup.student}; teacher: {setup.teacher}; vocabulary {setup.vocab} "
        "(opdistill's word-level tokenizer with its chat template, padded with dummy tokens)"
    )
    print(
        f"  batch {setup.batch_size} prompts (graph task), max_new_tokens {setup.max_new_tokens}, "
        f"lr {setup.lr}, λ = 1, JSD β = {setup.beta}, temperature 1; {args.warmup} warmup + "
        f"{args.steps} timed steps per tool, each tool in its own process"
    )
    print(f"  opdistill: rollout.backend={args.rollout}, train.max_staleness={args.max_staleness}")
    common.set_threads(args.threads)
    results: dict[str, Any] = {"setup": setup.to_dict(), "versions": versions}
    with tempfile.TemporaryDirectory(prefix="opdistill-bench-models-") as tmp:
        models = Path(tmp)
        built = common.build(setup)
        common.save_built(built, models)
        agreement = loss_agreement(built, setup)
        del built
        print_agreement(agreement)
        results["loss_agreement"] = agreement
        worker_args = [
            "--setup",
            json.dumps(setup.to_dict()),
            "--models",
            str(models),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
            "--trl-trainer",
            args.trl_trainer,
            "--rollout",
            args.rollout,
            "--max-staleness",
            str(args.max_staleness),
        ]
        for tool in ("opdistill", "trl"):
            print(f"\nrunning {tool} ...", flush=True)
            python = args.worker_python if tool == "opdistill" else None
            results[tool] = common.run_worker(
                Path(__file__), ["--worker", tool, *worker_args], tool, python
            )
    return report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> int:
    ours, theirs = results["opdistill"], results["trl"]
    rows = []
    for name, result in (("opdistill", ours), (TRL_TRAINERS[args.trl_trainer], theirs)):
        if "error" in result:
            rows.append([name, result["error"], "–", "–", "–"])
            continue
        result["median_seconds"] = common.median(result["seconds"])
        tokens = sum(result["response_tokens"]) / max(1, len(result["response_tokens"]))
        rows.append(
            [
                name,
                f"{result['median_seconds']:.3f}",
                f"{tokens:.0f}",
                f"{result['peak_rss_mib']:.0f}",
                f"{result['rss_after_load_mib']:.0f}",
            ]
        )
        print(f"{name} settings: {result['settings']}")
    print(
        f"\nsummary ({args.steps} timed steps after {args.warmup} warmup; peak RSS of each tool's "
        "own process):"
    )
    print(
        common.table(
            ["tool", "s/step (median)", "response tokens/step", "peak RSS MiB", "RSS loaded MiB"],
            rows,
        )
    )
    if "error" not in ours and "error" not in theirs:
        same = ours["prompts_digest"] == theirs["prompts_digest"]
        results["same_prompts"] = same
        print(f"same prompts in the same order in both tools: {'yes' if same else 'NO'}")
        counted = [n for n in theirs.get("num_items_in_batch", []) if n is not None]
        generated = theirs["response_tokens"]
        normaliser = sum(counted) / max(1, len(counted))
        if counted and generated and normaliser != sum(generated) / len(generated):
            print(
                "note: TRL divides its on-policy loss by num_items_in_batch, counted from the "
                f"dataset completions before generation (mean {normaliser:.0f}), not by the "
                f"generated response tokens (mean {sum(generated) / len(generated):.0f}) that "
                "opdistill divides by; the step's work is the same either way."
            )
    time_ratio = common.ratio(ours.get("median_seconds"), theirs.get("median_seconds"))
    rss_ratio = common.ratio(ours.get("peak_rss_mib"), theirs.get("peak_rss_mib"))
    agreement = results["loss_agreement"]
    worst = max((r.get("rel_diff", 0.0) for r in agreement["rows"]), default=0.0)
    results["summary"] = {
        "step_time_ratio": time_ratio,
        "peak_rss_ratio": rss_ratio,
        "loss_max_rel_diff": worst,
        "loss_agreement_ok": agreement["ok"],
    }
    print(f"step time ratio opdistill/TRL: {common.fmt(time_ratio)} (goal ≤ 0.5)")
    print(f"peak RSS ratio opdistill/TRL:  {common.fmt(rss_ratio)}")
    verdict = "agree" if agreement["ok"] else "DISAGREE"
    print(
        f"loss agreement: {verdict} (largest relative difference {worst:.1e}; tolerance "
        f"{LOSS_RTOL:g} on the value, {GRAD_RTOL:g} on the gradient)"
    )
    if args.quick:
        print("(--quick: tiny sizes, a smoke run; the numbers mean nothing)")
    if args.json:
        common.write_result(args.json, results)
        print(f"results written to {args.json}")
    failed = not agreement["ok"] or "error" in ours or "error" in theirs
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
