"""How opdistill's on-policy step time grows with batch size, response length and vocabulary.

Starting from the setup of `vs_trl_step.py` (batch 4, max_new_tokens 128, vocabulary 49,152),
one quantity varies at a time; every point trains a fresh copy of the same initial student for
`--warmup` + `--steps` steps in this process and reports the median seconds per step. Prints a
table and saves a plot.

    python benchmarks/scaling.py [--batch-sizes 1,2,4,8] [--new-tokens 32,64,128,256]
        [--vocabs 8192,32768,49152,152064] [--output benchmarks/results/scaling.png] [--quick]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import StepSetup

SWEEPS = {"batch_size": "batch size", "max_new_tokens": "max_new_tokens", "vocab": "vocabulary"}


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int_list, default=None, help="1,2,4,8")
    parser.add_argument("--new-tokens", type=int_list, default=None, help="32,64,128,256")
    parser.add_argument("--vocabs", type=int_list, default=None, help="8192,32768,49152,152064")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=Path,
        default=common.RESULTS_DIR / "scaling.png",
        help="plot file (default: benchmarks/results/scaling.png)",
    )
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch_sizes = args.batch_sizes or ([1, 2] if quick else [1, 2, 4, 8])
    args.new_tokens = args.new_tokens or ([4, 8] if quick else [32, 64, 128, 256])
    args.vocabs = args.vocabs or ([512, 1024] if quick else [8192, 32768, 49152, 152064])
    if quick and args.steps == 3:
        args.steps = 1
    return args


def time_point(
    setup: StepSetup, built: common.Built, steps: int, warmup: int
) -> tuple[float, float]:
    """Median seconds per step and mean response tokens per step of a fresh student copy."""
    point = common.Built(
        built.tokenizer, copy.deepcopy(built.student), built.teacher, built.examples
    )
    seconds, tokens = [], []
    with tempfile.TemporaryDirectory(prefix="opdistill-bench-scaling-") as output_dir:
        trainer = common.opdistill_trainer(setup, point, warmup + steps, output_dir)
        for index in range(warmup + steps):
            started = time.perf_counter()
            stats = trainer.step()
            if index >= warmup:
                seconds.append(time.perf_counter() - started)
                tokens.append(stats.num_tokens)
    return common.median(seconds), sum(tokens) / max(1, len(tokens))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    base = StepSetup.quick(seed=args.seed) if args.quick else StepSetup(seed=args.seed)
    print(
        f"opdistill on-policy step time (JSD β = {base.beta}, λ = 1, fp32, CPU): student "
        f"{base.student}; teacher {base.teacher}; base point batch {base.batch_size}, "
        f"max_new_tokens {base.max_new_tokens}, vocabulary {base.vocab}; median of "
        f"{args.steps} step(s) after {args.warmup} warmup per point"
    )
    built_by_vocab: dict[int, common.Built] = {}
    points: list[dict[str, Any]] = []
    for field, values in (
        ("batch_size", args.batch_sizes),
        ("max_new_tokens", args.new_tokens),
        ("vocab", args.vocabs),
    ):
        for value in values:
            setup = dataclasses.replace(base, **{field: value})
            if setup.vocab not in built_by_vocab:
                built_by_vocab.clear()  # one vocabulary's models at a time
                built_by_vocab[setup.vocab] = common.build(setup)
            seconds, tokens = time_point(
                setup, built_by_vocab[setup.vocab], args.steps, args.warmup
            )
            points.append(
                {"sweep": field, "value": value, "seconds": seconds, "response_tokens": tokens}
            )
            print(f"  {SWEEPS[field]} {value}: {seconds:.3f} s/step", flush=True)

    rows = [
        [
            SWEEPS[p["sweep"]],
            p["value"],
            f"{p['seconds']:.3f}",
            f"{p['response_tokens']:.0f}",
            f"{1000 * p['seconds'] / max(1.0, p['response_tokens']):.2f}",
        ]
        for p in points
    ]
    print()
    print(
        common.table(
            ["varied", "value", "s/step (median)", "response tokens/step", "ms/response token"],
            rows,
        )
    )
    plot(points, base, args.output)
    print(f"plot written to {args.output}")
    if args.quick:
        print("(--quick: tiny sizes, a smoke run; the numbers mean nothing)")
    if args.json:
        common.write_result(args.json, {"base": base.to_dict(), "points": points})
        print(f"results written to {args.json}")
    return 0


def plot(points: list[dict[str, Any]], base: StepSetup, output: Path) -> None:
    """One panel per varied quantity: seconds per step against its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SWEEPS), figsize=(4 * len(SWEEPS), 3.4))
    for axis, (field, label) in zip(axes, SWEEPS.items(), strict=True):
        chosen = [p for p in points if p["sweep"] == field]
        values = [p["value"] for p in chosen]
        axis.plot(values, [p["seconds"] for p in chosen], marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xticks(values, [str(v) for v in values], rotation=30)
        axis.minorticks_off()
        axis.set_xlabel(label)
        axis.set_ylabel("seconds per step")
        axis.set_ylim(0, 1.15 * max(p["seconds"] for p in chosen))
        axis.grid(alpha=0.3)
        axis.axvline(getattr(base, field), color="grey", linestyle=":", linewidth=1)
    figure.suptitle("opdistill on-policy step time (others at the dotted base point)")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
