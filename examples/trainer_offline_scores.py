"""transformers' `Trainer` with SLM from offline scores: pack a JSONL corpus, score it once, train.

    python examples/trainer_offline_scores.py --model HuggingFaceTB/SmolLM2-135M \
        --reference path/to/reference --data corpus.jsonl --out out/hf-slm

The reference is any causal LM with the student's tokenizer (e.g. the student fine-tuned on your
best data; `slm reference` makes one). `selective_lm.score` adds a `ref_loss` column (resumable:
rerun after a kill and it continues), and `SelectiveTrainer` trains on the top `--ratio` of each
batch's tokens by excess loss, normalised over the whole optimizer step as `slm train` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from selective_lm import Selection, SelectiveTrainer, score


def pack(texts: list[str], tokenizer: Any, block_len: int) -> dict[str, list[list[int]]]:
    """Documents joined by EOS and cut into blocks of `block_len` tokens (the last partial block dropped)."""
    stream = [t for text in texts for t in [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]]
    return {"input_ids": [stream[i : i + block_len] for i in range(0, len(stream) - block_len + 1, block_len)]}


def run(argv: list[str] | None = None) -> SelectiveTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="student: hub id or local directory")
    parser.add_argument("--reference", required=True, help="reference: hub id or local directory")
    parser.add_argument("--data", required=True, help='JSONL file, one {"text": ...} per line')
    parser.add_argument("--out", required=True)
    parser.add_argument("--block-len", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    corpus = datasets.load_dataset("json", data_files=args.data, split="train")
    blocks = corpus.map(lambda b: pack(b["text"], tokenizer, args.block_len), batched=True,
                        remove_columns=corpus.column_names)
    blocks = score(args.reference, blocks, cache_dir=Path(args.out) / "scores")
    model = AutoModelForCausalLM.from_pretrained(args.model)
    training = TrainingArguments(args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                 gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
                                 logging_steps=1, save_strategy="no", report_to=[])
    trainer = SelectiveTrainer(model=model, args=training, train_dataset=blocks, processing_class=tokenizer,
                               selection=Selection(method="topk", ratio=args.ratio))
    trainer.train()
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    run()
