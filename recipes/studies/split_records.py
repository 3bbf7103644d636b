"""An evaluation folder's ``results.json`` in two files: the summaries stay in ``results.json``,
the per-record data (every window and prompt, ``mc-retrofit eval``'s ``records``) goes to
``records.json.gz`` beside it. The summaries are what the tables, plots and studies read;
the records are 90% of the bytes.

    python recipes/studies/split_records.py DIR...          # split each folder (a split one is left as it is)
    python recipes/studies/split_records.py --join DIR...   # back to the one results.json eval wrote
    python recipes/studies/split_records.py --all           # every committed folder under recipes/studies/results

The split ``results.json`` has ``"records_file": "records.json.gz"`` where ``"records"`` was;
``--join`` gives back the original file byte for byte. The gzip stream is deterministic (no
name, mtime 0), so an unchanged split leaves git clean. ``load_results(DIR)`` reads either form
with the records in place.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
from pathlib import Path

RESULTS, RECORDS, POINTER = "results.json", "records.json.gz", "records_file"
STUDY_RESULTS = Path(__file__).resolve().parent / "results"


def _dump(data: dict) -> str:  # the format of mc_retrofit.eval.report.write_json
    return json.dumps(data, indent=1, sort_keys=False, allow_nan=False) + "\n"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-split")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _replace_key(data: dict, old: str, new: str, value) -> dict:
    """``data`` with ``old`` renamed to ``new`` (holding ``value``) in the same position."""
    return {(new if k == old else k): (value if k == old else v) for k, v in data.items()}


def gzip_bytes(text: str) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    return buf.getvalue()


def split(folder: str | Path) -> bool:
    """Move ``folder/results.json``'s records to ``records.json.gz``; False if there were none."""
    folder = Path(folder)
    data = json.loads((folder / RESULTS).read_text())
    if not isinstance(data.get("records"), list):
        return False
    records = data["records"]
    _write(folder / RECORDS, gzip_bytes(json.dumps(records, separators=(",", ":"), allow_nan=False) + "\n"))
    _write(folder / RESULTS, _dump(_replace_key(data, "records", POINTER, RECORDS)).encode("utf-8"))
    return True


def load_results(folder: str | Path) -> dict:
    """``folder/results.json`` with its records, whether it was split or not."""
    folder = Path(folder)
    data = json.loads((folder / RESULTS).read_text())
    if POINTER in data:
        with gzip.open(folder / data[POINTER], "rt", encoding="utf-8") as f:
            data = _replace_key(data, POINTER, "records", json.load(f))
    return data


def join(folder: str | Path) -> bool:
    """Undo ``split``: one ``results.json`` again, as ``mc-retrofit eval`` wrote it; False if not split."""
    folder = Path(folder)
    if not (folder / RESULTS).is_file() or POINTER not in json.loads((folder / RESULTS).read_text()):
        return False
    data = load_results(folder)
    _write(folder / RESULTS, _dump(data).encode("utf-8"))
    (folder / RECORDS).unlink()
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="*", type=Path, help="evaluation folders (holding results.json)")
    p.add_argument("--join", action="store_true", help="merge the records back into results.json")
    p.add_argument("--all", action="store_true", help=f"every folder under {STUDY_RESULTS} with a results.json")
    a = p.parse_args(argv)
    dirs = list(a.dirs) + (sorted(f.parent for f in STUDY_RESULTS.rglob(RESULTS)) if a.all else [])
    if not dirs:
        p.error("name a folder or give --all")
    for d in dirs:
        done = join(d) if a.join else split(d)
        print(f"{'joined' if a.join else 'split'} {d}" if done else f"left {d} (nothing to {'join' if a.join else 'split'})")


if __name__ == "__main__":
    main()
