"""On-policy distillation in a plain PyTorch loop: opdistill's losses, no Trainer.

The student samples responses with transformers `generate`, the teacher scores them, and the
student minimises the token-level generalized JSD (GKD) on its own samples:

    python examples/plain_pytorch_loop.py                                   # tiny models, offline
    python examples/plain_pytorch_loop.py --student PATH --teacher PATH     # any HF causal LMs

Without paths, a tiny teacher and student are built from a config on the graph path-finding
task (untrained: the loss still falls as the student moves toward the teacher).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdistill import losses, make_task
from opdistill.batch import Batch, batch_logits, chat_prompt, left_pad, response_mask_after_eos
from opdistill.models import build_word_tokenizer, tiny_llama


def sample(student, tokenizer, prompts: list[str], max_new_tokens: int) -> Batch:
    """Student responses to `prompts` by ancestral sampling, as an opdistill `Batch`."""
    prompt_ids, prompt_mask = left_pad(
        [chat_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id
    )
    student.eval()
    with torch.no_grad():
        output = student.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    student.train()
    response_ids = output[:, prompt_ids.shape[1] :]
    response_mask = response_mask_after_eos(response_ids, tokenizer.eos_token_id)
    return Batch(prompt_ids, prompt_mask, response_ids, response_mask, examples=[])


def main(argv: list[str] | None = None) -> list[float]:
    """Train; return the loss of every step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", help="path or hub id of the student (default: tiny)")
    parser.add_argument("--teacher", help="path or hub id of the teacher (default: tiny)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight β")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    task = make_task("graph", num_nodes=8, path_length=2)
    prompts = [e.prompt for e in task.examples("train", 64)]
    if args.student and args.teacher:
        tokenizer = AutoTokenizer.from_pretrained(args.student)
        student = AutoModelForCausalLM.from_pretrained(args.student)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    else:
        examples = task.examples("train", 200)
        tokenizer = build_word_tokenizer(e.prompt + " " + e.completion for e in examples)
        student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1)
        teacher = tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=2)
    teacher.eval().requires_grad_(False)
    vocab_size = len(tokenizer)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)

    history = []
    for step in range(args.steps):
        start = (step * args.batch_size) % len(prompts)
        batch = sample(
            student, tokenizer, prompts[start : start + args.batch_size], args.max_new_tokens
        )
        with torch.no_grad():
            teacher_logits = batch_logits(teacher, batch, vocab_size)
        student_logits = batch_logits(student, batch, vocab_size)
        per_token = losses.token_divergence(student_logits, teacher_logits, "jsd", beta=args.beta)
        loss = losses.token_mean(per_token, batch.response_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  JSD(β={args.beta}) per token {history[-1]:.4f}")
    return history


if __name__ == "__main__":
    main()
