"""Run under an FSDP2 launch: rank 0's rows end at their first token, rank 1's never do.

Prints one line per rank with the number of student forward passes and the response length;
a deadlock shows as the launch timing out.
"""

import os
import sys

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdistill.distributed import shard_on_cpu as _shard_on_cpu
from opdistill.rollout import HFGenerateRollout
from opdistill.rollout.base import synced_generation
from opdistill.tasks.base import Example

MAX_NEW_TOKENS = 6


def main(model_dir: str) -> None:
    accelerator = Accelerator()
    _shard_on_cpu(accelerator)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # FSDP2 prepares a model together with its optimizer
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    rank = accelerator.process_index
    sharded = all(isinstance(p, DTensor) for p in model.parameters())  # before any forward
    forwards = []

    def steer(module, inputs, output):  # rank 0: EOS at once; rank 1: never EOS
        forwards.append(1)
        eos = tokenizer.eos_token_id
        if rank == 0:
            output.logits[..., eos] = 1e4
        else:
            output.logits[..., eos] = -1e4
        return output

    model.register_forward_hook(steer)
    examples = [Example(prompt="path from A to B", completion="A B")] * 2
    batch = HFGenerateRollout(model, tokenizer).generate(examples, MAX_NEW_TOKENS, greedy=True)
    lengths = ",".join(str(n) for n in batch.response_mask.sum(dim=1).tolist())
    line = (
        f"rank={rank} type={accelerator.distributed_type.value} synced={synced_generation()} "
        f"sharded={sharded} forwards={len(forwards)} lengths={lengths}\n"
    )
    os.write(sys.stdout.fileno(), line.encode())  # one write: the ranks share the pipe
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
