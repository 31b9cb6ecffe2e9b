"""`custom`: the user's own corpus, one source per split in `data.sources`.

A source is a local .jsonl/.json/.txt/.parquet/.csv file or a hub dataset name, optionally
`name@split` (datasets split syntax; `split[a:b]` streams, other slices load the split whole).
Text comes from `data.text_field`; a .txt file holds one document per blank-line-separated
paragraph. Documents keep the source order (the split syntax already chooses the sample).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from . import Document, Split, register

if TYPE_CHECKING:
    from ..config import DataConfig

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
        raise UserError(f"cannot load dataset {source!r}: {_first_line(e)}") from None
    return ds, builder == "text"


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _custom_docs(source: str, field: str) -> Iterator[Document]:
    """Documents from a custom source, streamed; the text field is checked on the first row."""
    ds, is_text = _open_source(source)
    field = "text" if is_text else field
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
                raise UserError(f"cannot read {source!r}: {_first_line(e)}") from None
            if i == 0 and field not in row:
                raise UserError(f"{source!r} has no text field {field!r} (data.text_field); "
                                f"its columns: {', '.join(map(str, row)) or 'none'}")
            text = row[field]
            if isinstance(text, str):
                yield Document(text.strip() if is_text else text, origin="custom")
    finally:
        builders.setLevel(level)


@register("custom")
def custom(data: DataConfig) -> dict[str, Split]:
    """One split per `data.sources` entry (module docstring); `train` is required."""
    if "train" not in data.sources:
        raise UserError("data.corpus=custom needs data.sources.train (a .jsonl/.json/.txt/.parquet/.csv "
                        "file or a hub dataset name)")
    return {split: Split(_custom_docs(src, data.text_field),
                         {"sources": {"corpus": "custom", "source": src, "text_field": data.text_field}})
            for split, src in data.sources.items()}
