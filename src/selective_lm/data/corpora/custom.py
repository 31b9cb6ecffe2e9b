"""`custom`: the user's own corpus, one source per split in `data.sources`.

A source is a local .jsonl/.json/.txt/.parquet/.csv file or a hub dataset name, optionally
`name@split` (datasets split syntax; `split[a:b]` streams, other slices load the split whole).
Text comes from `data.text_field`; a .txt file holds one document per blank-line-separated
paragraph. Documents keep the source order (the split syntax already chooses the sample).

Supervised fine-tuning (`data.format`, not for .txt files):
- `prompt_response`: the document is prompt + `data.separator` + response (from
  `data.prompt_field` and `data.response_field`); only the response is trained.
- `chat`: `data.messages_field` holds a list of {role, content} messages; `slm prepare` renders
  it with the tokenizer's chat template and trains the assistant turns only (`chat.render_chat`).
The fields are checked on the first row (a missing one names the columns there). A bad row later on —
a field missing or not a string, an empty response, a conversation without an assistant turn or with a
role chat templates do not know (`human`/`bot`) — stops `slm prepare` naming the file and line, unless
`data.bad_rows=skip`: then it is skipped and counted (`skipped_rows` in the split's meta.json and in
the command's output).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import UserError, first_line
from . import Document, Split, register

if TYPE_CHECKING:
    from ...config import DataConfig

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
_SLICE = re.compile(r"^(?P<base>[\w.-]+)\[(?P<a>\d*):(?P<b>\d*)\]$")


def _open_source(source: str) -> tuple[Any, bool]:
    """A datasets IterableDataset (or Dataset) for a source string; and whether it is a .txt file."""
    import datasets

    name, split = source, None
    if "@" in source and not Path(source).expanduser().exists():
        name, split = source.rsplit("@", 1)
    path = Path(name).expanduser()
    kwargs: dict[str, Any] = {}
    builder = name
    if path.suffix.lower() in _LOCAL_BUILDERS:
        if not path.is_file():
            raise UserError(f"corpus file {path} not found (data.sources: {source!r})")
        if path.stat().st_size == 0:
            raise UserError(f"corpus file {path} is empty (data.sources: {source!r})")
        builder = _LOCAL_BUILDERS[path.suffix.lower()]
        kwargs["data_files"] = str(path)
        if builder == "text":
            kwargs["sample_by"] = "paragraph"
    elif name.startswith((".", "/", "~")) and not path.exists():
        raise UserError(f"corpus path {path} not found (data.sources: {source!r}); "
                        f"use a {'/'.join(_LOCAL_BUILDERS)} file or a hub dataset name")
    split = split or "train"
    sliced = _SLICE.match(split)
    try:
        if sliced or "[" not in split:
            ds = datasets.load_dataset(builder, split=sliced["base"] if sliced else split, streaming=True, **kwargs)
            if sliced:
                start = int(sliced["a"] or 0)
                ds = ds.skip(start)
                if sliced["b"]:
                    ds = ds.take(max(0, int(sliced["b"]) - start))
        else:  # percent slices etc.: datasets resolves them on a loaded split only
            ds = datasets.load_dataset(builder, split=split, **kwargs)
    except Exception as e:  # hub/network/format errors all mean: this source cannot be read
        raise UserError(f"cannot load dataset {source!r}: {first_line(e)}") from None
    return ds, builder == "text"


def _fields(data: DataConfig) -> dict[str, str]:
    """The fields a row of `data.format` needs: config key -> field name."""
    if data.format == "prompt_response":
        return {"prompt_field": data.prompt_field, "response_field": data.response_field}
    if data.format == "chat":
        return {"messages_field": data.messages_field}
    return {"text_field": data.text_field}


ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates render


class BadRow(ValueError):
    """A row that cannot become a document (what is wrong with it): an error, or skipped with data.bad_rows=skip."""


def _messages(value: Any, field: str) -> tuple[dict[str, Any], ...]:
    """A row's conversation as role/content dicts (None values dropped: datasets fills absent keys with None)."""
    if value is None:
        raise BadRow(f"no {field!r} (data.messages_field)")
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise BadRow(f"{field!r} must be a list of {{role, content}} messages with string values "
                     f"(got {str(value)[:80]})")
    roles = {m["role"] for m in value}
    if unknown := sorted(roles - set(ROLES)):
        raise BadRow(f"unknown role {unknown[0]!r} in {field!r} (chat templates know {', '.join(ROLES)})")
    if "assistant" not in roles:
        raise BadRow(f"the conversation in {field!r} has no assistant turn: nothing of it would be trained")
    return tuple({k: v for k, v in m.items() if v is not None} for m in value)


def _text(row: dict[str, Any], field: str, key: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise BadRow(f"{'no' if value is None else 'a non-string'} {field!r} (data.{key})")
    return value


def _document(row: dict[str, Any], data: DataConfig) -> Document:
    """The row's document in `data.format`; BadRow when it has none to give."""
    if data.format == "prompt_response":
        prompt = _text(row, data.prompt_field, "prompt_field")
        response = _text(row, data.response_field, "response_field")
        if not response.strip():
            raise BadRow(f"an empty {data.response_field!r} (data.response_field): nothing of it would be trained")
        start = len(prompt) + len(data.separator)
        text = prompt + data.separator + response
        return Document(text, trained=((start, len(text)),))
    if data.format == "chat":
        return Document("", messages=_messages(row.get(data.messages_field), data.messages_field))
    return Document(_text(row, data.text_field, "text_field"))


def _custom_docs(source: str, data: DataConfig, meta: dict[str, Any]) -> Iterator[Document]:
    """Documents from a custom source, streamed; the fields of `data.format` are checked on the first row, every
    row's content as it comes (`_document`); rows skipped by data.bad_rows=skip are counted in `meta`."""
    ds, is_text = _open_source(source)
    if is_text and data.format != "text":
        raise UserError(f"{source!r} is a .txt file, plain text only: data.format={data.format} needs rows with "
                        f"fields ({', '.join(_fields(data).values())}) in a .jsonl/.json/.parquet/.csv file")
    rows = iter(ds)
    # The json/csv/parquet builders log a parse error before raising it; the raise becomes our one line.
    builders = logging.getLogger("datasets.packaged_modules")
    level = builders.level
    builders.setLevel(logging.CRITICAL)
    try:
        for i in itertools.count():
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # parse errors of the user's file surface while streaming
                raise UserError(f"cannot read {source!r}: {first_line(e)}") from None
            if is_text:
                if isinstance(row["text"], str):
                    yield Document(row["text"].strip())
                continue
            for key, field in _fields(data).items() if i == 0 else ():
                if field not in row:
                    raise UserError(f"{source!r} has no {key.removesuffix('_field')} field {field!r} (data.{key}); "
                                    f"its columns: {', '.join(map(str, row)) or 'none'}")
            try:
                doc = _document(row, data)
            except BadRow as e:
                if data.bad_rows != "skip":
                    where = f"line {i + 1}" if Path(source).suffix.lower() == ".jsonl" else f"row {i + 1}"
                    raise UserError(f"{source!r} {where}: {e}; fix the row, or set data.bad_rows=skip to skip "
                                    "such rows (counted in meta.json)") from None
                meta["skipped_rows"] = meta.get("skipped_rows", 0) + 1
                continue
            yield doc
    finally:
        builders.setLevel(level)


@register("custom")
def custom(data: DataConfig) -> dict[str, Split]:
    """One split per `data.sources` entry (module docstring); `train` is required."""
    if "train" not in data.sources:
        raise UserError("data.corpus=custom needs data.sources.train (a .jsonl/.json/.txt/.parquet/.csv "
                        "file or a hub dataset name)")
    fields: dict[str, str] = _fields(data)
    if data.format == "prompt_response":
        fields["separator"] = data.separator
    if data.format != "text":  # text stores keep the meta (and fingerprint) they always had
        fields = {"format": data.format, **fields}
    splits = {}
    for split, src in data.sources.items():
        meta: dict[str, Any] = {"sources": {"corpus": "custom", "source": src, **fields}}
        splits[split] = Split(_custom_docs(src, data, meta), meta)  # the count lands in meta while it is read
    return splits
