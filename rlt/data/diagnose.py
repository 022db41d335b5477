"""Why a local data file did not load: the first byte that is not UTF-8, or the first line that is not valid JSON.

`datasets` / pyarrow report these as "position N" of a block of the file, as a generic "error while generating the
dataset", or not at all (pyarrow's JSON reader keeps non-UTF-8 bytes, which then fail mid-training).
`explain_load_failure` rescans the files in Python, only after loading failed (the happy path stays pyarrow's), and
returns one `DataError` that names the file, the line, the byte offset or column, and the fix.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import shlex
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rlt.errors import DataError

# byte-order marks -> encoding name (UTF-32 first: its little-endian BOM starts with UTF-16's)
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_NAMES = {"LATIN1": "latin-1 (ISO-8859-1)", "CP1252": "cp1252 (Windows-1252)"}  # iconv name -> display name
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}
_GUESS_BYTES = 1 << 16  # how much of the file's start (plus the bad line) `guess_encoding` looks at
_SNIPPET = 60  # characters of a line shown in a message


def first_undecodable(lines: bytes | Iterable[bytes]) -> tuple[int, int, bytes] | None:
    """``(line, byte_offset, bad_bytes)`` of the first bytes that are not UTF-8, or None when all of it is UTF-8.

    `lines` is the file's content, or its lines with their line ends (a file opened in ``"rb"`` mode): ``line`` is
    1-based, ``byte_offset`` 0-based from the start of the file, ``bad_bytes`` the bytes UTF-8 rejects there (the
    start of a multi-byte sequence that does not continue, or a byte no sequence starts with). A line end never falls
    inside a valid UTF-8 sequence, so decoding line by line finds what decoding the whole file finds.

    >>> first_undecodable(b'{"q": "ok"}\\n{"q": "caf\\xe9"}\\n')   # latin-1 e-acute: byte 22 = 12 + len('{"q": "caf')
    (2, 22, b'\\xe9')
    >>> first_undecodable(b'\\xff\\xfeh\\x00i\\x00')                 # UTF-16 (a byte-order mark first)
    (1, 0, b'\\xff')
    >>> first_undecodable('caf\\u00e9\\n'.encode()) is None            # UTF-8 e-acute
    True
    """
    offset = 0
    for number, line in enumerate(io.BytesIO(lines) if isinstance(lines, bytes) else lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return number, offset + e.start, line[e.start:max(e.end, e.start + 1)]
        offset += len(line)
    return None


def guess_encoding(sample: bytes) -> str | None:
    """The encoding a non-UTF-8 `sample` most likely has, as `iconv` names it, or None when no simple guess fits.

    A UTF-16 / UTF-32 byte-order mark names it. Otherwise, when the sample has no valid multi-byte UTF-8 sequence
    (else it is UTF-8 with stray bytes): ``CP1252`` when bytes 0x80-0x9f occur (curly quotes, dashes, the euro sign:
    printable in Windows-1252 only) and every byte is defined there; ``LATIN1`` when every non-ASCII byte is a
    printable Latin-1 character (0xa0-0xff).

    >>> guess_encoding(b'\\xff\\xfe{\\x00')
    'UTF-16'
    >>> guess_encoding(b'caf\\xe9 na\\xefve')
    'LATIN1'
    >>> guess_encoding(b'\\x93quoted\\x94 \\x80 5')
    'CP1252'
    >>> guess_encoding(b'caf\\xc3\\xa9 and a stray \\xff') is None      # UTF-8 'e-acute' plus a bad byte
    True
    """
    for bom, name in _BOMS:
        if sample.startswith(bom):
            return name
    if any(ord(c) > 127 for c in sample.decode("utf-8", errors="ignore")):
        return None
    high = {b for b in sample if b > 127}
    if any(0x80 <= b <= 0x9F for b in high):
        try:
            sample.decode("cp1252")
        except UnicodeDecodeError:
            return None
        return "CP1252"
    return "LATIN1" if high else None


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _document_error(text: str) -> tuple[int, int, str, str] | None:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        lines = text.split("\n")
        return e.lineno, e.colno, e.msg, lines[e.lineno - 1] if e.lineno <= len(lines) else ""
    return None


def first_bad_json_line(text: str, *, jsonl: bool | None = None) -> tuple[int, int, str, str] | None:
    """``(line, column, message, line_text)`` of the first JSON error in `text`, or None when it is valid.

    ``line`` and ``column`` are 1-based (column in characters), ``message`` is `json`'s (or "expected a JSON object
    per line, got ..." for a JSON-lines row that is not an object), ``line_text`` the whole line. A text starting with
    ``[`` is one document (as `datasets` reads it: a list of rows); otherwise `jsonl` True means one object per line
    (blank lines allowed), False one document, None guesses: JSON lines when its first non-blank line is valid JSON
    by itself (a pretty-printed object's ``{`` line is not).

    >>> first_bad_json_line('{"q": "a"}\\n\\n{"q": "b"}\\n{"q": #### 3}\\n', jsonl=True)
    (4, 7, 'Expecting value', '{"q": #### 3}')
    >>> first_bad_json_line('{"q": "a"}\\n[1, 2]\\n')
    (2, 1, 'expected a JSON object per line, got an array', '[1, 2]')
    >>> first_bad_json_line('[\\n  {"q": "a"},\\n  {"q": "b" "a": 1}\\n]')
    (3, 13, "Expecting ',' delimiter", '  {"q": "b" "a": 1}')
    >>> first_bad_json_line('{\\n  "q": "a"\\n}\\n') is None
    True
    """
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if text.lstrip().startswith("["):
        jsonl = False
    elif jsonl is None:
        first = next((line for line in lines if line.strip()), "")
        jsonl = _document_error(first) is None
    if not jsonl:
        return _document_error(text)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return number, e.colno, e.msg, line
        if not isinstance(value, dict):
            return (number, len(line) - len(line.lstrip()) + 1,
                    f"expected a JSON object per line, got {_json_type(value)}", line)
    return None


def _snippet(text: str, column: int = 1) -> str:
    """`text` (one line) cut to about `_SNIPPET` characters around `column`, quoted, unprintables escaped."""
    text = text.rstrip("\r")
    start = max(0, column - 1 - _SNIPPET // 2) if column > _SNIPPET else 0
    cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[start:start + _SNIPPET])
    return ("..." if start else "") + f"'{cut}'" + ("..." if start + _SNIPPET < len(text) else "")


def _undecodable_message(path: Path, line: int, offset: int, bad: bytes) -> str:
    with open(path, "rb") as f:
        head = f.read(_GUESS_BYTES)
        f.seek(max(0, offset - 4 * _SNIPPET))
        around = f.read(8 * _SNIPPET)
    rel = offset - max(0, offset - 4 * _SNIPPET)
    line_start = around.rfind(b"\n", 0, rel) + 1
    line_end = around.find(b"\n", rel)
    line_bytes = around[line_start:line_end if line_end >= 0 else len(around)]
    context = _snippet(line_bytes.decode("utf-8", errors="backslashreplace"),
                       len(line_bytes[:rel - line_start].decode("utf-8", errors="backslashreplace")) + 1)
    encoding = guess_encoding(head + b"\n" + line_bytes)
    src = shlex.quote(str(path))
    tmp = shlex.quote(f"{path}.utf8")
    how = f"iconv -f {encoding or 'LATIN1'} -t UTF-8 {src} > {tmp} && mv {tmp} {src}"
    fix = (f"it looks like {_NAMES.get(encoding, encoding)}: re-encode it, e.g. `{how}`" if encoding else
           f"re-encode it from its actual encoding, e.g. `{how}` for latin-1")
    shown = " ".join(f"0x{b:02x}" for b in bad)
    return (f"data file '{path}' is not UTF-8: line {line}, byte offset {offset}: byte{'s' * (len(bad) > 1)} "
            f"{shown} (in {context}); {fix}")


def _json_message(path: Path, line: int, column: int, message: str, text: str) -> str:
    return (f"data file '{path}' is not valid JSON: line {line}, column {column}: {message} "
            f"(in {_snippet(text, column)})")


def _root_cause(error: BaseException) -> BaseException:
    """The first exception in `error`'s chain that is not `datasets`' generic DatasetGenerationError wrapper."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if type(current).__name__ != "DatasetGenerationError":
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return error


def diagnose_file(path: Path) -> str | None:
    """The one-line problem with local data file `path` (not UTF-8, or for .json/.jsonl not valid JSON), or None."""
    if path.suffix.lower() == ".parquet":
        return None
    with open(path, "rb") as f:
        bad = first_undecodable(f)
    if bad is not None:
        return _undecodable_message(path, *bad)
    if path.suffix.lower() in (".json", ".jsonl"):
        jsonl = True if path.suffix.lower() == ".jsonl" else None
        found = first_bad_json_line(path.read_text(encoding="utf-8"), jsonl=jsonl)
        if found is not None:
            return _json_message(path, *found)
    return None


def _drop_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextmanager
def quiet_builder_errors(builder: str) -> Iterator[None]:
    """Drop the ERROR records `datasets`' packaged `builder` logs for a file it cannot read ("Failed to load JSON from
    file ... in row 2", 0-based rows of a block) while loading: `explain_load_failure` reports the problem instead."""
    builder_logger = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    builder_logger.addFilter(_drop_errors)
    try:
        yield
    finally:
        builder_logger.removeFilter(_drop_errors)


def explain_load_failure(files: Sequence[Path], builder: str, split: str, error: BaseException) -> DataError:
    """The `DataError` for `error`, raised while loading `files` with `datasets` builder `builder` as `split`: the
    first file with a problem `diagnose_file` finds, else `error`'s own (first-line) message."""
    for path in files:
        try:
            problem = diagnose_file(Path(path))
        except OSError:
            continue
        if problem is not None:
            return DataError(problem)
    cause = _root_cause(error)
    first_line = next((line for line in str(cause).splitlines() if line.strip()), "")
    return DataError(f"could not read {builder} file(s) {[str(f) for f in files]} for split '{split}': "
                     f"{type(cause).__name__}: {first_line}")
