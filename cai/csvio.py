"""CSV in, with the file line each row starts on, and one-line errors naming `file:line`.

    from cai.csvio import read_csv
    rows = read_csv(text, "pairs.csv")     # [(line, {"prompt": ..., "chosen": ...}), ...]

Used by the prompt loader and the preference importers. Python's csv module has traps a data
file hits sooner or later, each of which used to end in a bare `_csv.Error` traceback or, worse,
in silently wrong rows:
- fields over 128 KiB (a long transcript) fail with "field larger than field limit": the limit is
  raised here;
- the text must be split into lines the way `open(..., newline="")` does (the csv docs require
  it): a stray `\\r` is then a line end like any other, and a quoted field keeps its newlines. The
  old `str.splitlines()` also split on U+2028 and form feeds inside quoted text;
- a malformed file (an unterminated or stray quote) is read in strict mode and refused with a
  `CaiError` naming the line, instead of being glued into one giant field;
- row numbers are real file lines (a row with a quoted newline spans two), so an error about a
  row points at the line an editor shows.

Rows are dicts keyed by the header row, as `csv.DictReader` builds them: a short row fills the
missing columns with None, a long row keeps its extra fields in a list under the key None.
Blank lines are skipped; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped.
"""

from __future__ import annotations

import csv
import io
import sys

from cai.errors import CaiError

# The whole file is already in memory, so a field may be as large as the file (C long bound).
FIELD_SIZE_LIMIT = min(sys.maxsize, 2**31 - 1)


def read_csv(text: str, source: str) -> list[tuple[int, dict]]:
    """Parse CSV text with a header row into `(line, row)` pairs; `line` is where the row starts."""
    if csv.field_size_limit() < FIELD_SIZE_LIMIT:
        csv.field_size_limit(FIELD_SIZE_LIMIT)
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict]] = []
    start = 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields:
                continue  # a blank line
            if header is None:
                header = fields
                _check_header(header, f"{source}:{line}")
                continue
            row = dict(zip(header, fields))
            if len(fields) > len(header):
                row[None] = fields[len(header) :]
            for name in header[len(fields) :]:
                row[name] = None
            rows.append((line, row))
    except csv.Error as exc:
        where = "" if start == reader.line_num else f" in the row starting at line {start}"
        raise CaiError(f"malformed CSV{where}: {exc}", source=f"{source}:{reader.line_num}") from None
    return rows


def _check_header(header: list[str], where: str) -> None:
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            raise CaiError(f"duplicate column '{name}' in the header row", source=where)
        seen.add(name)
