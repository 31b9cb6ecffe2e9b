"""Supervised fine-tuning on chat data with TRL's `SFTTrainer` and SLM on the assistant's tokens.

    pip install 'selective-lm[trl]'
    python examples/sft_chat.py --model HuggingFaceTB/SmolLM2-135M-Instruct --reference path/to/reference \
        --data chats.jsonl --out out/sft-slm

Each line of the data: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}. The
recipe renders each conversation with the tokenizer's chat template and labels every assistant turn
(its answer and end-of-turn text), all other tokens -100 (system, user, the template's headers), so
selection ranks assistant tokens only and `--ratio` is a share of them. The reference scores each
batch online (it must share the tokenizer).
"""

from __future__ import annotations

import argparse
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selective_lm import Selection, selective_sft_trainer


def run(argv: list[str] | None = None) -> Any:
    from trl import SFTConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    args = parser.parse_args(argv)

    data = datasets.load_dataset("json", data_files=args.data, split="train")  # the messages as they are
    config = SFTConfig(args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=not torch.cuda.is_available())  # TRL's default bf16 needs a GPU
    trainer = selective_sft_trainer(model=AutoModelForCausalLM.from_pretrained(args.model), args=config,
                                    train_dataset=data, processing_class=AutoTokenizer.from_pretrained(args.model),
                                    selection=Selection(method="topk", ratio=args.ratio),
                                    reference_model=AutoModelForCausalLM.from_pretrained(args.reference))
    trainer.train()
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    run()
