"""Write the embedded CHAMP corpus as prompt/response JSONL files, for a fine-tuning study with data.format.

    python scripts/champ_sft.py out/champ-sft-data
    slm run --out out/champ-sft data.corpus=custom data.format=prompt_response data.separator= \
        data.noise_rate=0 data.sources.reference=out/champ-sft-data/reference.jsonl \
        data.sources.train=out/champ-sft-data/train.jsonl data.sources.val_clean=out/champ-sft-data/val_clean.jsonl \
        data.sources.val_noisy=out/champ-sft-data/val_noisy.jsonl grid.methods=[topk,random] grid.ratios=[0.5] \
        grid.oracle=false

The splits are those of `data.corpus=champ` with its default settings (disjoint reference,
training and validation problems), without injected noise. The prompt is everything up to and
including the "Solution:" line (the problem; in human documents also CHAMP's concepts and hints),
the response is the solution: human-written in reference and val_clean (the reference split also
mixes in noise-free model-written solutions), model-written (fluent, often wrong) in train and
val_noisy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selective_lm.config import DataConfig
from selective_lm.data.corpora import CORPORA, Document

HEAD = "Solution:\n"


def prompt_response(doc: Document) -> dict[str, str]:
    """Split a CHAMP document after its "Solution:" line (model documents: their protected header)."""
    cut = doc.protect if doc.protect else doc.text.index(HEAD) + len(HEAD)
    return {"prompt": doc.text[:cut], "response": doc.text[cut:], "source_id": doc.source_id or ""}


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for split, plan in CORPORA["champ"](DataConfig(noise_rate=0.0)).items():
        rows = [prompt_response(d) for d in plan.documents]
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} documents")


if __name__ == "__main__":
    main(sys.argv[1])
