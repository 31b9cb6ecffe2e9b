"""`slm bench`'s side cases on real data and at GPU scale: precision, gpu, prepare (`bench.cases`)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, DataConfig
from ..data.corpora import CORPORA
from ..errors import UserError
from ..files import atomic_path
from ..method.selection import scores, select
from ..prepare import BATCH_DOCS, prepare
from ..store.blocks import SCORE_STORAGE, decode_scores
from ..store.frozen import encode_losses, model_token_losses
from ..store.layout import OutDir
from ..training.models import load_model, load_tokenizer, tokenizer_fingerprint
from .steps import PASS_VARIANTS, TRAIN_VARIANTS, run_case

PRECISION_RATIOS = (0.5, 0.3)
HALF_DTYPES = ("float16", "bfloat16")


def precision(cfg: Config, out: OutDir) -> dict[str, Any]:
    """What storing reference losses in half precision (`scoring.dtype`) changes, on the data of `out`.

    On `bench.precision_blocks` scored train blocks: the share of the tokens that top-k selects from the
    float32 reference losses that it also selects from their float16 / bfloat16 roundings, selecting as
    training does at step 0 (excess loss = losses of the base model `cfg.model` minus reference losses,
    per batch of `train.batch_size` blocks, `train.scope`). And the bytes per billion tokens of the score
    store in each dtype and of the token store, from the files' sizes. Skipped (with the commands that
    make them) without a train token store and a float32 score store of this model.
    """
    make = f"make them with `slm run --out {out}` (or `slm prepare`, `slm reference`, `slm score --out {out}`)"
    if not out.store_dir("train").is_dir() or not out.has_scores("train"):
        return {"skipped": f"no train token store and score store in {out}: {make}"}
    if (stored := out.score_dtype("train")) != "float32":
        return {"skipped": f"the score store in {out} is {stored}, the case compares with float32: rerun "
                           f"`slm score --out {out} scoring.dtype=float32`"}
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    try:
        store = out.store("train")
        ref = out.scores("train", store, tokenizer_fingerprint(tokenizer), "float32")
    except UserError as e:
        return {"skipped": f"{e} ({make})"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model, vocab_size=len(tokenizer)).to(device).eval().requires_grad_(False)
    rows = out.scored_blocks("train", cfg.bench.precision_blocks * store.block_len)
    if not len(rows):
        return {"skipped": f"the score store in {out} covers no block: rerun `slm score --out {out}`"}
    kept = {d: dict.fromkeys(PRECISION_RATIOS, 0) for d in HALF_DTYPES}
    selected = dict.fromkeys(PRECISION_RATIOS, 0)
    max_error = dict.fromkeys(HALF_DTYPES, 0.0)
    for i in range(0, len(rows), cfg.train.batch_size):
        batch = rows[i : i + cfg.train.batch_size]
        ids = torch.from_numpy(np.asarray(store.tokens[batch], dtype=np.int64)).to(device)
        valid = torch.from_numpy(store.targets(batch, cfg.data.doc_boundaries)).to(device)  # the trainer's targets
        own = model_token_losses(model, ids, valid, cfg.scoring.chunk_size)
        ref32 = torch.from_numpy(np.asarray(ref[batch]))
        refs = {d: torch.from_numpy(decode_scores(encode_losses(ref32, d), d)) for d in HALF_DTYPES}
        for d, low in refs.items():  # NaN (position 0, unscored) on both sides: no error
            max_error[d] = max(max_error[d], float(torch.nan_to_num((low - ref32).abs(), nan=0.0).max()))
        for ratio in PRECISION_RATIOS:
            base = select(scores("excess", own, ref32.to(device)), ratio, "topk", cfg.train.scope, valid)
            selected[ratio] += int(base.sum())
            for d, low in refs.items():
                chosen = select(scores("excess", own, low.to(device)), ratio, "topk", cfg.train.scope, valid)
                kept[d][ratio] += int((chosen & base).sum())
    n_tokens = int(store.meta["n_tokens"])
    positions = store.n_blocks * store.block_len
    header = (out.scores_dir("train") / "ref_loss.npy").stat().st_size - positions * 4
    token_bytes = sum(f.stat().st_size for f in out.store_dir("train").glob("*.npy"))
    return {
        "model": cfg.model.name, "blocks": len(rows), "block_len": store.block_len,
        "batch_size": cfg.train.batch_size, "scope": cfg.train.scope,
        "agreement": {d: {str(r): kept[d][r] / max(selected[r], 1) for r in PRECISION_RATIOS} for d in HALF_DTYPES},
        "max_abs_error": max_error,
        "score_bytes_per_billion_tokens": {d: (header + positions * SCORE_STORAGE[d].itemsize) * 1e9 / n_tokens
                                           for d in SCORE_STORAGE},
        "token_store_bytes_per_billion_tokens": token_bytes * 1e9 / n_tokens,
        "seconds": time.perf_counter() - start,
    }




# Dense bf16 peak TFLOPS by device-name fragment (first match wins): the MFU denominator of case gpu.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0}


def gpu(cfg: Config, out: OutDir) -> dict[str, Any]:
    """Case gpu: tokens/s and model-FLOPs utilisation of CLM, SLM and naive steps and of scoring, at scale.

    A randomly initialised TinyLlama-1.1B-shaped Llama (`bench.gpu_model`), full fine-tuning,
    bf16 autocast on CUDA, batch `bench.gpu_batch_size` x `bench.gpu_block_len`, through
    `run_case` (the same variants as the step cases). Model FLOPs per token (PaLM's count): 6N +
    12 L d T for a training step, 2N + 4 L d T for a forward pass, N the matmul weights; SLM counts
    the FLOPs of the model on every token fed (the useful work is the same sequence). MFU needs the
    device's peak: `bench.gpu_peak_tflops`, else PEAK_BF16_TFLOPS by name.
    """
    b = cfg.bench
    if not torch.cuda.is_available() and not b.gpu_on_cpu:
        return {"skipped": "no CUDA device: run `slm bench bench.cases=[gpu]` on a GPU machine"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = cfg.model.model_copy(update={"name": b.gpu_model, "tokenizer": None, "lora": False})
    settings = {**b.model_dump(), "batch_size": b.gpu_batch_size, "block_len": b.gpu_block_len}
    case = run_case(model_cfg, b.gpu_vocab, device, settings, cfg.scoring.chunk_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = b.gpu_peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    attention = case["layers"] * case["hidden"] * case["block_len"]
    flops = {"train": 6 * case["matmul_params"] + 12 * attention, "pass": 2 * case["matmul_params"] + 4 * attention}
    for v in (*TRAIN_VARIANTS, *PASS_VARIANTS):
        entry = case[v]
        entry["tokens_per_s"] = case["tokens"] / entry["step_s"]
        per_token = flops["train"] if v in TRAIN_VARIANTS else flops["pass"]
        entry["mfu"] = entry["tokens_per_s"] * per_token / (peak * 1e12) if peak and v != "backbone" else None
    return {**case, "model_flops_per_token": flops, "peak_tflops": peak}




PREPARE_RUNS = {"1_proc": (0.0, 1), "2_proc": (0.0, 2), "noise_1_proc": (0.2, 1), "noise_2_proc": (0.2, 2)}
# name -> (data.noise_rate, data.num_proc) of each timed `prepare` of case prepare


def prepare_case(cfg: Config, out: OutDir) -> dict[str, Any]:
    """Case prepare: tokens/s of `slm prepare` beside the bare tokenizer on the same texts.

    The corpus: the embedded CHAMP corpus's train documents (model-written solutions), cycled to
    about `bench.prepare_tokens` tokens of `cfg.model`'s tokenizer, written once as JSONL under
    `bench/` and reused; `data.corpus=custom` streams it through `datasets`, as a user's corpus.
    `bare`: `tokenizer(texts, add_special_tokens=False)` on batches of data.BATCH_DOCS texts in this
    process and nothing else: the ceiling. Each of PREPARE_RUNS is the real `prepare` of the train
    split into a throwaway store, timed from the call, so loading the tokenizer and opening the
    dataset count (`setup_s`, a prepare of one block after a warm-up one, is what they cost).
    `vs_bare`: tokens/s (tokens written) over bare's. Bare and every run are timed round-robin for
    `bench.prepare_rounds` rounds and the medians kept (`s_all` has every round): one pass of a few
    seconds moved by 20 % between identical rounds here. `same_store`: whether the stores of a noise
    rate are identical for every num_proc (they must be). Peak memory is not measured here: it would
    be this process's, models included; tests/test_data.py measures prepare's on a large corpus.
    """
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    corpus = _prepare_corpus(tokenizer, cfg.bench.prepare_tokens, out.bench_dir)
    with corpus.open() as f:
        texts = [json.loads(line)["text"] for line in f]

    def bare() -> tuple[float, int]:
        t = time.perf_counter()
        n = sum(len(ids) for i in range(0, len(texts), BATCH_DOCS)
                for ids in tokenizer(texts[i:i + BATCH_DOCS], add_special_tokens=False)["input_ids"])
        return time.perf_counter() - t, n

    scratch = out.bench_dir / "prepare-store"

    def timed(noise_rate: float, num_proc: int, cap: int | None = None) -> tuple[float, dict[str, Any]]:
        data = cfg.data.model_copy(update={"corpus": "custom", "sources": {"train": str(corpus)}, "max_tokens": cap,
                                           "noise_rate": noise_rate, "num_proc": num_proc})
        shutil.rmtree(scratch, ignore_errors=True)  # else prepare would reuse the store of the last run
        t = time.perf_counter()
        prepare(cfg.model_copy(update={"data": data}), scratch, splits=["train"])
        return time.perf_counter() - t, OutDir.of(scratch).store("train").meta

    try:
        setup_s = min(timed(0.0, 1, cfg.data.block_len)[0] for _ in range(2))  # the first imports datasets
        times: dict[str, list[float]] = {name: [] for name in ("bare", *PREPARE_RUNS)}
        metas: dict[str, dict[str, Any]] = {}
        fingerprints: dict[str, set[str]] = {}
        for _ in range(cfg.bench.prepare_rounds):
            seconds, bare_tokens = bare()
            times["bare"].append(seconds)
            for name, (rate, num_proc) in PREPARE_RUNS.items():
                seconds, metas[name] = timed(rate, num_proc)
                times[name].append(seconds)
                fingerprints.setdefault(str(rate), set()).add(metas[name]["fingerprint"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bare_s = statistics.median(times["bare"])
    runs = {}
    for name, (rate, num_proc) in PREPARE_RUNS.items():
        meta, seconds = metas[name], statistics.median(times[name])
        runs[name] = {"noise_rate": rate, "num_proc": num_proc, "s": seconds, "s_all": times[name],
                      "tokens": meta["n_tokens"], "tokens_per_s": meta["n_tokens"] / seconds,
                      "vs_bare": meta["n_tokens"] / seconds / (bare_tokens / bare_s)}
        if meta["noise"]:
            runs[name]["realized_noise_rate"] = meta["noise"]["realized_rate"]
    return {
        "tokenizer": cfg.model.tokenizer or cfg.model.name, "corpus": str(corpus), "docs": len(texts),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "bare": {"s": bare_s, "s_all": times["bare"], "tokens": bare_tokens, "tokens_per_s": bare_tokens / bare_s},
        "setup_s": setup_s, "runs": runs, "same_store": {r: len(fp) == 1 for r, fp in fingerprints.items()},
        "seconds": time.perf_counter() - start,
    }


def _prepare_corpus(tokenizer: Any, n_tokens: int, where: Path) -> Path:
    """CHAMP's train documents cycled to about `n_tokens` tokens, as JSONL; made once per size and tokenizer."""
    path = where / f"prepare-corpus-{n_tokens}-{tokenizer_fingerprint(tokenizer)}.jsonl"
    if path.is_file():
        return path
    texts = [d.text for d in CORPORA["champ"](DataConfig())["train"].documents]
    sample = texts[:64]
    chars_per_token = sum(map(len, sample)) / sum(map(len, tokenizer(sample, add_special_tokens=False)["input_ids"]))
    chars = 0
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for text in itertools.cycle(texts):
            if chars >= n_tokens * chars_per_token:
                break
            f.write(json.dumps({"text": text}) + "\n")
            chars += len(text)
    return path


