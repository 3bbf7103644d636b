"""Documents, as ``(name, text)`` pairs, from wherever ``--data`` points:

- a ``.txt`` file, or a folder of ``.txt`` files (sorted; for training the evaluation-only
  books are skipped by name);
- a ``.jsonl`` file, one JSON object a line, the text under ``--text-field``;
- a ``datasets`` dataset saved with ``save_to_disk`` (a ``DatasetDict`` picks ``--split``);
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a ``datasets`` Hub dataset, streamed
  (``load_dataset(..., streaming=True)``) and read only as far as needed.

For training (``training=True``) the text of every document, whatever its source, is
checked against the evaluation-only books by content (:mod:`mc_retrofit.eval_only`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .. import tasks
from ..errors import MCError
from ..eval_only import check_not_eval_only

HUB_PREFIX = "hf:"
EVAL_SPLITS = ("test", "validation", "train")  # evaluation: held-out splits first


def is_streamed(source) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def check_source(source) -> None:
    """Fail early (before any model loads) on a local source that does not exist."""
    if is_streamed(source):
        if not _hub_name(source)[0]:
            raise MCError(f"--data {source}: give a dataset name after hf:, e.g. hf:NAME or hf:NAME:CONFIG")
        return
    if not Path(source).exists():
        raise MCError(f"data path {source} does not exist")


def load_texts(source: str | Path, text_field: str = "text", split: str | None = None, *, training: bool = False,
               max_chars: int | None = None) -> list[tuple[str, str]]:
    """Every document of a local ``source`` (a streamed one: until ``max_chars`` characters,
    which it then needs)."""
    if is_streamed(source):
        if max_chars is None:
            raise MCError(f"{source} is streamed and has no end: it needs a budget (--max-tokens)")
        out, n = [], 0
        for name, text in iter_texts(source, text_field, split, training=training):
            out.append((name, text))
            n += len(text)
            if n >= max_chars:
                break
        return out
    return list(iter_texts(source, text_field, split, training=training))


def iter_texts(source, text_field: str = "text", split: str | None = None, *,
               training: bool = False) -> Iterator[tuple[str, str]]:
    """The documents of ``source`` one at a time (a streamed dataset is read lazily)."""
    check_source(source)
    if is_streamed(source):
        docs = _streamed(source, text_field, split, training)
    else:
        docs = iter(_local(Path(source), text_field, split, training))
    for name, text in docs:
        if training:
            check_not_eval_only(text.encode("utf-8"), name)
        yield name, text


def _local(p: Path, text_field: str, split: str | None, training: bool) -> list[tuple[str, str]]:
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        return _jsonl(p, text_field)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        return _from_disk(p, text_field, split, training)
    if p.is_file() and p.suffix != ".txt" and not training:
        raise MCError(f"{p}: expected a .txt or .jsonl file, a folder of .txt files, or a saved datasets dataset")
    if p.is_file() and p.name in tasks.EVAL_ONLY and training:
        raise MCError(f"{p.name} is an evaluation-only book; do not train on it")
    docs = tasks.read_documents(p, "train" if training else "all")
    if not docs:
        raise MCError(f"{p} has no {'training ' if training else ''}.txt files and is not a dataset saved with "
                      "datasets' save_to_disk" + (" (evaluation-only books are skipped)" if training else ""))
    return decoded(docs)


def _jsonl(p: Path, text_field: str) -> list[tuple[str, str]]:
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MCError(f"{p} line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise MCError(f"{p} line {n} has no string field {text_field!r} (use --text-field)")
            out.append((f"{p.name}:{n}", row[text_field]))
    if not out:
        raise MCError(f"{p} holds no documents")
    return out


def _pick_split(names: list[str], split: str | None, training: bool, where: str) -> str:
    if split is not None:
        if split not in names:
            raise MCError(f"{where} has splits {', '.join(names)}, not {split!r}")
        return split
    if training:  # never tune on a test split by accident
        if "train" not in names:
            raise MCError(f"{where} has splits {', '.join(names)} and no 'train': choose one with --split")
        return "train"
    return next((s for s in EVAL_SPLITS if s in names), names[0])


def _missing_column(where: str, columns, text_field: str) -> MCError:
    return MCError(f"{where} has columns {', '.join(columns)}, not {text_field!r} (use --text-field)")


def _from_disk(path: Path, text_field: str, split: str | None, training: bool) -> list[tuple[str, str]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = ds[_pick_split(list(ds), split, training, str(path))]
    if text_field not in ds.column_names:
        raise _missing_column(str(path), ds.column_names, text_field)
    out = [(f"{path.name}[{i}]", t) for i, t in enumerate(ds[text_field]) if isinstance(t, str)]
    if not out:
        raise MCError(f"{path} holds no text in its {text_field!r} column")
    return out


def _hub_name(source: str) -> tuple[str, str | None]:
    name, _, config = source[len(HUB_PREFIX):].partition(":")
    return name, config or None


def _streamed(source: str, text_field: str, split: str | None, training: bool) -> Iterator[tuple[str, str]]:
    import datasets

    name, config = _hub_name(source)
    split = split or ("train" if training else "test")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - offline, unknown name or split: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MCError(f"could not stream the dataset {name} (split {split}): {first}") from None
    columns = getattr(ds, "column_names", None)  # None when the features are not known up front
    if columns is not None and text_field not in columns:
        raise _missing_column(source, columns, text_field)
    n = -1
    for n, row in enumerate(ds):
        if text_field not in row:
            raise _missing_column(source, list(row), text_field)
        if isinstance(row[text_field], str):
            yield f"{name}[{n}]", row[text_field]
    if n < 0:
        raise MCError(f"{source} (split {split}) holds no documents")


def decoded(docs: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """``--data`` text as text mode reads it: UTF-8 (bad bytes replaced), universal newlines."""
    return [(name, data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n"))
            for name, data in docs]


def default_texts() -> list[tuple[str, str]]:
    """The evaluation-only Gutenberg books (never used in training), their bytes decoded as
    they are (the committed evaluations were measured on these exact texts)."""
    books = tasks.read_documents(tasks.gutenberg_dir(), "eval")
    return [(name, data.decode("utf-8", errors="replace")) for name, data in books]
