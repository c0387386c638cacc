"""Peak memory and time of the JSD loss alone (forward + backward) at a large vocabulary.

Rows: opdistill's `chunked_token_divergence` (token mean), TRL's `generalized_jsd_loss` (the loss
of its GKDTrainer) and opdistill's plain `token_divergence` (token mean), all with β = 0.5 and
temperature 1 on fp32 logits [batch, positions, vocab] (default 8 × 512 × 152,064). Each row runs in
a fresh subprocess: it allocates the student logits (requires_grad) and the teacher logits,
records its resident memory as the baseline, then runs forward + backward `--repeats` times.
"Extra" is the peak resident memory minus that baseline: the memory the loss itself needs, the
gradient of the student logits (one logits-sized tensor) included.

When the default size would not fit in the available memory (a short calibration run of every
row gives the memory per position), every row is measured at the largest number of positions
that fits, and the script says so.

    python benchmarks/loss_memory.py [--batch 8] [--seq-len 512] [--vocab 152064] [--quick]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import common

ROWS = {
    "opdistill_chunked": "opdistill chunked_token_divergence + token_mean",
    "trl": "TRL generalized_jsd_loss (batchmean over labels != -100)",
    "opdistill_plain": "opdistill token_divergence + token_mean",
}
CALIBRATION_SEQ_LEN = 32
VALUE_RTOL = 1e-5
GRAD_RTOL = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="sequences (8)")
    parser.add_argument("--seq-len", type=int, default=None, help="positions per sequence (512)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (152064)")
    parser.add_argument("--repeats", type=int, default=3, help="forward+backward runs per row")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=0, help="chunked loss: 0 = automatic")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.8,
        help="share of the available memory a row may plan to use",
    )
    parser.add_argument("--seed", type=int, default=0)
    common.add_common_args(parser)
    parser.add_argument("--worker", choices=list(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch = args.batch or (2 if quick else 8)
    args.seq_len = args.seq_len or (16 if quick else 512)
    args.vocab = args.vocab or (4096 if quick else 152_064)
    if quick and args.repeats == 3:
        args.repeats = 1
    return args


# ------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Allocate the logits, take the baseline, then time forward + backward of one loss."""
    import torch

    from opdistill.losses import chunked_token_divergence, token_divergence, token_mean

    torch.manual_seed(args.seed)
    shape = (args.batch, args.seq_len, args.vocab)
    student = torch.randn(shape).mul_(2.0).requires_grad_(True)  # in place: no temporaries
    teacher = torch.randn(shape).mul_(3.0)
    lengths = args.seq_len - torch.randint(0, max(1, args.seq_len // 4), (args.batch,))
    mask = torch.arange(args.seq_len)[None, :] < lengths[:, None]
    labels = torch.where(mask, 0, -100)
    beta = args.beta

    if args.worker == "trl":
        from trl.experimental.gkd import GKDTrainer

        def loss() -> torch.Tensor:
            return GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)

    elif args.worker == "opdistill_chunked":

        def loss() -> torch.Tensor:
            values = chunked_token_divergence(
                student, teacher, "jsd", beta=beta, chunk_size=args.chunk_size
            )
            return token_mean(values, mask)

    else:

        def loss() -> torch.Tensor:
            return token_mean(token_divergence(student, teacher, "jsd", beta=beta), mask)

    baseline = common.current_rss_mib()
    before = common.peak_rss_mib()
    seconds = []
    for _ in range(args.repeats):
        student.grad = None
        started = time.perf_counter()
        value = loss()
        value.backward()
        seconds.append(time.perf_counter() - started)
    peak = common.peak_rss_mib()
    return {
        "seconds": seconds,
        "baseline_rss_mib": baseline,
        "peak_before_mib": before,
        "peak_rss_mib": peak,
        "extra_mib": peak - baseline,
        "value": float(value.detach()),
        "grad_norm": float(student.grad.norm()),
    }


def run_row(row: str, args: argparse.Namespace, seq_len: int) -> dict[str, Any]:
    arguments = [
        "--worker",
        row,
        "--batch",
        str(args.batch),
        "--seq-len",
        str(seq_len),
        "--vocab",
        str(args.vocab),
        "--repeats",
        str(args.repeats),
        "--beta",
        str(args.beta),
        "--chunk-size",
        str(args.chunk_size),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    return common.run_worker(Path(__file__), arguments, ROWS[row])


# ------------------------------------------------------------------------------- size planning
def plan_seq_len(args: argparse.Namespace) -> tuple[int, str | None, dict[str, Any]]:
    """The positions per sequence to measure at, a note when it is below the request, and the
    calibration results (reused as the measurement when the sizes coincide)."""
    calibration_len = min(args.seq_len, CALIBRATION_SEQ_LEN)
    logits_mib_per_position = args.vocab * 4 / common.MIB
    calibration = {row: run_row(row, args, calibration_len) for row in ROWS}
    positions = args.batch * calibration_len
    needs = {}
    for row, result in calibration.items():
        if "error" in result:
            continue
        process = result["baseline_rss_mib"] - 2 * positions * logits_mib_per_position
        per_position = 2 * logits_mib_per_position + result["extra_mib"] / positions
        needs[row] = (process, per_position)
    if calibration_len == args.seq_len:
        return args.seq_len, None, calibration
    if not needs:
        return args.seq_len, None, {}

    budget = common.available_mib() * args.memory_fraction
    wanted = args.batch * args.seq_len
    required = {row: p + wanted * per for row, (p, per) in needs.items()}
    limiting = max(required, key=required.__getitem__)
    if required[limiting] <= budget:
        return args.seq_len, None, {}
    process, per_position = needs[limiting]
    fitting = int((budget - process) / per_position) // args.batch
    seq_len = max(1, min(args.seq_len, fitting))
    note = (
        f"the requested {args.batch}×{args.seq_len} positions need about "
        f"{required[limiting] / 1024:.1f} GiB for {ROWS[limiting]} (estimated from a run at "
        f"{args.batch}×{calibration_len}), more than {args.memory_fraction:.0%} of the "
        f"{common.available_mib() / 1024:.1f} GiB available: every row is measured at "
        f"{args.batch}×{seq_len} positions instead"
    )
    return seq_len, note, {}


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        common.set_threads(args.threads)
        common.write_result(args.worker_result, worker(args))
        return 0

    print(
        f"JSD (β = {args.beta}, temperature 1) forward + backward on fp32 logits, each row in a "
        "fresh process"
    )
    seq_len, note, calibration = plan_seq_len(args)
    if note:
        print(f"note: {note}")
    logits_gib = args.batch * seq_len * args.vocab * 4 / 1024**3
    print(
        f"logits [{args.batch}, {seq_len}, {args.vocab}] ({logits_gib:.2f} GiB each, student and "
        f"teacher allocated before the baseline); median of {args.repeats} run(s)"
    )
    results = dict(calibration)  # the calibration runs, when they were at the measured size
    for row in ROWS:
        if row not in results:
            print(f"running {ROWS[row]} ...", flush=True)
            results[row] = run_row(row, args, seq_len)
    return report(args, seq_len, note, results)


def report(
    args: argparse.Namespace, seq_len: int, note: str | None, results: dict[str, Any]
) -> int:
    rows = []
    for row, result in results.items():
        if "error" in result:
            rows.append([ROWS[row], result["error"], "–", "–", "–"])
            continue
        result["median_seconds"] = common.median(result["seconds"])
        rows.append(
            [
                ROWS[row],
                f"{result['extra_mib']:.0f}",
                f"{result['peak_rss_mib']:.0f}",
                f"{result['median_seconds']:.3f}",
                f"{result['value']:.9f}",
            ]
        )
    print(common.table(["loss", "extra peak MiB", "total peak MiB", "seconds", "value"], rows))

    trl = results["trl"]
    summary: dict[str, Any] = {"seq_len": seq_len, "note": note}
    for row in ("opdistill_chunked", "opdistill_plain"):
        ours = results[row]
        memory = common.ratio(ours.get("extra_mib"), trl.get("extra_mib"))
        seconds = common.ratio(ours.get("median_seconds"), trl.get("median_seconds"))
        summary[row] = {"extra_memory_ratio": memory, "time_ratio": seconds}
        goal = " (goal ≤ 0.25)" if row == "opdistill_chunked" else ""
        print(
            f"{ROWS[row]} / TRL: extra memory {common.fmt(memory)}{goal}, "
            f"time {common.fmt(seconds)}"
        )

    measured = [r for r in results.values() if "error" not in r]
    agree = True
    if measured:
        first = measured[0]
        for other in measured[1:]:
            value_diff = abs(other["value"] - first["value"]) / max(abs(first["value"]), 1e-30)
            grad_diff = abs(other["grad_norm"] - first["grad_norm"]) / max(
                first["grad_norm"], 1e-30
            )
            agree = agree and value_diff <= VALUE_RTOL and grad_diff <= GRAD_RTOL
    spread = max((r["value"] for r in measured), default=math.nan) - min(
        (r["value"] for r in measured), default=math.nan
    )
    summary["values_agree"] = agree
    print(
        f"values {'agree' if agree else 'DISAGREE'} (largest difference {spread:.2e}; tolerance "
        f"{VALUE_RTOL:g} relative on the value, {GRAD_RTOL:g} on the gradient norm)"
    )
    if args.quick:
        print("(--quick: tiny sizes, a smoke run; the numbers mean nothing)")
    if args.json:
        common.write_result(
            args.json,
            {
                "batch": args.batch,
                "seq_len": seq_len,
                "vocab": args.vocab,
                "rows": results,
                "summary": summary,
            },
        )
        print(f"results written to {args.json}")
    failed = not agree or "error" in trl
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
