"""champ_answer: documents, few-shot exemplars and answer checking (loaded by lm-eval through the YAML's `!function`).

The documents are exactly the validation problems of `corpora.champ.champ_partition` under the run's data
settings (passed by `selective_lm.harness` as task metadata; lm-eval's own CLI gets the default settings), so
no training or reference problem is ever evaluated. Exemplars come from the training problems, only those
with a short statement and answer, to keep the prompt (and the CPU time) small.

CHAMP answers are short phrases ("No", "0 is the only possible value", "The limit exists and is equal to
@@2/3@@"; `@@` marks the mathematical parts in `_raw_answer`). A prediction is correct when it equals the
answer as text (case, spaces and a final period aside); for yes/no answers when its first word is the
answer's; otherwise when math-verify finds a formula it states equivalent to one that states the answer
(`_gold_forms`, `_predicted_forms`). Answers made of several parts ("376 and 625") need the text.
"""

from __future__ import annotations

import re
from typing import Any

from datasets import Dataset, DatasetDict
from math_verify import parse, verify

from selective_lm.config import DataConfig
from selective_lm.data.corpora.champ import champ_partition, load_champ
from selective_lm.harness import DATA_METADATA

EXEMPLAR_MAX_ANSWER = 40  # characters: 145 of the 162 default training problems qualify
EXEMPLAR_MAX_PROBLEM = 200
_MATH = re.compile(r"@@(.+?)@@")
_TOKEN = re.compile(r"\S+")
_PUNCTUATION = ".,;:!?()[]'\""
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_COMMAND = re.compile(r"\\?[A-Za-z]{2,}")  # function names, LaTeX commands, products such as `xy`
_VARIABLE = re.compile(r"[A-Za-z](?!\s*\()")  # a one-letter name not applied as a function: `n`, not `C(`
_LEAD = re.compile(r"^(?:\s*(?:is|to|be|as|of|=|:))*\s*")  # "... is equal to| 2/3"
# Words that are mathematics, not prose, in a formula.
_FUNCTIONS = {"sqrt", "frac", "dfrac", "cdot", "times", "binom", "sin", "cos", "tan", "log", "exp", "infty", "gcd",
              "lcm", "max", "min", "mod", "pmod", "leq", "geq", "neq", "sum", "prod", "floor", "ceil", "lim"}


def champ_dataset(**metadata: Any) -> DatasetDict:
    """`validation`: the held-out problems; `train`: the short training problems (few-shot exemplars)."""
    corpus = load_champ()
    part = champ_partition(DataConfig.model_validate(metadata.get(DATA_METADATA) or {}), corpus)
    problems = corpus["problems"]

    def rows(ids: list[str]) -> list[dict[str, str]]:
        return [{"id": pid, "category": problems[pid]["category"], "problem": problems[pid]["_text"],
                 "answer": problems[pid]["_answer"], "raw_answer": problems[pid]["_raw_answer"]} for pid in ids]

    exemplars = [r for r in rows(part.train_problems)
                 if len(r["answer"]) <= EXEMPLAR_MAX_ANSWER and len(r["problem"]) <= EXEMPLAR_MAX_PROBLEM]
    return DatasetDict({"validation": Dataset.from_list(rows(part.val_problems)),
                        "train": Dataset.from_list(exemplars)})


def _text(s: str) -> str:
    return " ".join(s.replace("$", "").lower().split()).rstrip(".")


def _prose(s: str) -> list[re.Match[str]]:
    """The words of `s` (whitespace-separated, of 2+ letters, not a function name): `xyz` in `3xyz` is none."""
    return [m for m in _TOKEN.finditer(s) if len(w := m.group().strip(_PUNCTUATION)) >= 2 and w.isalpha()
            and w.lower() not in _FUNCTIONS]


def _gold_forms(raw_answer: str, answer: str) -> list[str]:
    """The formulas that state the answer: its one `@@` part, any of its parts when they are alternatives ("or
    equivalently"), the whole answer when it is a formula, or the one number of a phrase ("0 is the only
    possible value"); none (text comparison only) when several parts or numbers make the answer together."""
    parts = _MATH.findall(raw_answer)
    if len(parts) == 1 or (parts and "equivalent" in raw_answer):
        return parts
    if parts:
        return []
    if not _prose(answer):
        return [answer]
    numbers = _NUMBER.findall(answer)
    return numbers if len(numbers) == 1 else []


def _predicted_forms(prediction: str) -> list[str]:
    """The formulas a prediction states: all of it when it is one, else the formula ending its sentence ("The
    answer is 1/n"), else its one number when it has exactly one ("0 is the only possible value")."""
    words = _prose(prediction)
    if not words:
        return [prediction]
    tail = _LEAD.sub("", prediction[words[-1].end():]).strip()
    if tail:
        return [tail]
    numbers = _NUMBER.findall(prediction)
    return numbers if len(numbers) == 1 else []


def _formula(form: str) -> list[Any]:
    """math-verify's reading of a bare formula (`2^n`, `(n+1)/(r+1)`, `[-1, 1]`) as LaTeX math; none when it
    read only a part of it (the 2 of `2^floor(n/2)`, the 1 of `sum_(i=1)^n i^3`: a constant from a formula
    with a variable), which would make every "2" correct."""
    text = form.replace("$", "").strip().rstrip(".")
    found = parse(f"${text}$")
    variables = _VARIABLE.search(_COMMAND.sub(" ", text))
    return [] if found and variables and not getattr(found[0], "free_symbols", True) else found


def is_correct(raw_answer: str, answer: str, prediction: str) -> bool:
    """Whether `prediction` gives the answer (module docstring)."""
    pred = prediction.strip()
    if not pred:
        return False
    if _text(pred) == _text(answer):
        return True
    first = _text(answer).split(" ", 1)[0].strip(",")
    if first in ("yes", "no"):
        return _text(pred).split(" ", 1)[0].strip(",") == first
    gold = [_formula(g) for g in _gold_forms(raw_answer, answer)]
    guesses = [found for f in _predicted_forms(pred) if (found := _formula(f))]
    return any(verify(g, guess) for g in gold if g for guess in guesses)


def process_results(doc: dict[str, str], results: list[str]) -> dict[str, float]:
    return {"acc": float(is_correct(doc["raw_answer"], doc["answer"], results[0]))}
