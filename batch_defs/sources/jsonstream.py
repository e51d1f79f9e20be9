"""The json source, streamed with ijson: records come one by one out of a document of any size.

ijson's C backend (yajl) is fast but not safe on every input: an integer over 4300 digits
crashes the process, a lone surrogate escape silently becomes "?", and ijson's prefixes make
deep nesting cost memory quadratic in the depth. So the bytes reach the parser through a
_Feed that checks them on the way, in C-speed passes over whole strings: it stops at bytes
invalid in the encoding and at nesting deeper than MAX_DOCUMENT_NESTING, and it notices the
constructs yajl mishandles. Then the document is read again by ijson's pure-Python backend
(skipping the records already given), which reads them right; it also says where a syntax
error is, so a syntax error is located the same way.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import ijson

from batch_defs.sources import (
    RawRecord,
    SourceError,
    check_encoding,
    json_type,
    record_problem,
)

# Deeper documents end the read there (a record nested deeper than MAX_NESTING but less than
# this is one invalid row); ijson needs memory quadratic in the depth.
MAX_DOCUMENT_NESTING = 1000
_MAX_INT_DIGITS = 4300  # longer integers crash the C backend (and Python refuses them)
_BLOCK = 1 << 18

_OUTSIDE = re.compile(rb'(?:[^"]++|"(?:[^"\\]++|\\.)*+")*+', re.S)  # up to an unclosed string
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.S)
_STRING_BODY = re.compile(rb'(?:[^"\\]++|\\.)*+', re.S)
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]', re.S)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DIGITS = bytes(ord("0") if ord("0") <= b <= ord("9") else ord(" ") for b in range(256))
_STOPPED = "the rest of the file cannot be read, so this record and any after it are missing"


class _Feed:
    """The file as UTF-8 bytes for ijson (which calls read()), checked on the way. A string is
    handed on once it is whole, so the checks never see half an escape."""

    def __init__(self, raw: IO[bytes], encoding: str, fast: bool):
        self.raw, self.encoding, self.fast = raw, encoding, fast
        self.utf8 = encoding.lower().replace("_", "-") in ("utf-8", "utf8", "utf-8-sig")
        self.decoder = codecs.getincrementaldecoder("utf-8" if self.utf8 else encoding)()
        self.pending = b""  # the start of a UTF-8 sequence cut by the end of a block
        self.string: list[bytes] | None = None  # a string not closed yet, held back
        self.escaped = False  # the held string ends with the backslash of an escape
        self.depth = 0
        self.digits = 0  # digits at the end of what was checked (a number may go on)
        self.line = 1  # at the end of what was handed on
        self.blank = True  # nothing but whitespace handed on
        self.out = bytearray()
        self.started = self.done = False
        self.stop: tuple[int, str] | None = None  # (line, why) the feed ended early
        self.unsafe = False  # saw what only the pure-Python backend reads right

    def read(self, size: int) -> bytes:
        while len(self.out) < size and not self.done:
            self._next_block()
        chunk = bytes(self.out[:size])
        del self.out[:size]
        return chunk

    def _next_block(self) -> None:
        block = self.raw.read(_BLOCK)
        if not self.started and self.utf8:
            block = block.removeprefix(codecs.BOM_UTF8)
        self.started = True
        data, bad = self._decode(block, final=not block)
        self._check(data)
        if bad is not None and self.stop is None:
            self.stop = (self.line, bad)
        self.done = not block or self.stop is not None or self.unsafe

    def _decode(self, block: bytes, final: bool) -> tuple[bytes, str | None]:
        """(the valid UTF-8 bytes, why the bytes after them are invalid, or None)."""
        if not self.utf8:
            try:
                return self.decoder.decode(block, final).encode("utf-8"), None
            except UnicodeError:
                return b"", f"not valid {self.encoding}"
        data, self.pending = self.pending + block, b""
        try:
            data.decode("utf-8")
            return data, None
        except UnicodeDecodeError as exc:
            if exc.end == len(data) and not final and "unexpected end" in exc.reason:
                self.pending = data[exc.start:]
                return data[:exc.start], None
            good = data[:exc.start]
            column = exc.start - good.rfind(b"\n")
            return good, f"not valid {self.encoding} (byte {column} of the line)"

    def _check(self, data: bytes) -> None:
        at = 0 if self.string is None else self._continue_string(data, 0)
        if at < 0:
            return
        end = _OUTSIDE.match(data, at).end()  # type: ignore[union-attr]
        region = data[at:end]
        plain = _STRING.sub(b" ", region)  # what is between the strings
        cut = self._nesting(region, plain)
        if cut is not None:
            self.stop = (self.line + region.count(b"\n", 0, cut),
                         f"nested deeper than {MAX_DOCUMENT_NESTING} levels")
            region = region[:cut]
            plain = _STRING.sub(b" ", region)
        if self.fast and self._unsafe(region, plain):
            self.unsafe = True  # and yajl must not see it
            return
        self._hand_on(region)
        if cut is None and end < len(data):  # a string opens there, to go on past this block
            self.string = [b'"']
            self._continue_string(data, end + 1)

    def _continue_string(self, data: bytes, at: int) -> int:
        """data[at:] goes on with the held string: hand it on if it closes in data and return
        the offset after its closing quote, else hold data too and return -1."""
        assert self.string is not None
        start = at + 1 if self.escaped else at
        end = _STRING_BODY.match(data, min(start, len(data))).end()  # type: ignore[union-attr]
        if end < len(data) and data[end] == ord('"'):
            whole = b"".join([*self.string, data[at:end + 1]])
            self.string, self.escaped = None, False
            if self.fast and _lone_surrogate(whole):
                self.unsafe = True
                return -1
            self._hand_on(whole)
            return end + 1
        self.escaped = end == len(data) - 1  # stopped at a backslash, the last byte
        self.string.append(data[at:])
        return -1

    def _nesting(self, region: bytes, plain: bytes) -> int | None:
        """Track the depth; the offset of the bracket that goes too deep, if any."""
        brackets = plain.translate(_BRACKETS, _NOT_BRACKETS)
        unmatched, inner = brackets, 0
        while b"()" in unmatched and self.depth + inner <= MAX_DOCUMENT_NESTING:
            unmatched = unmatched.replace(b"()", b"")  # one level of nesting at a time
            inner += 1
        opens = unmatched.count(b"(")  # what is left: unmatched closes, then opens
        if self.depth + opens + inner <= MAX_DOCUMENT_NESTING:
            self.depth += opens - (len(unmatched) - opens)
            return None
        for token in _TOKEN.finditer(region):  # rare: close to the limit, find the place
            if token.group() in (b"[", b"{"):
                self.depth += 1
                if self.depth > MAX_DOCUMENT_NESTING:
                    return token.start()
            elif token.group() in (b"]", b"}"):
                self.depth -= 1
        return None

    def _unsafe(self, region: bytes, plain: bytes) -> bool:
        """Whether the region (whole strings and what is between them, plain) has a lone
        surrogate escape or a run of more than 4300 digits outside strings."""
        if b"\\u" in region and _lone_surrogate(region):
            return True
        digits = plain.translate(_DIGITS)  # digits as "0", anything else " "
        lead = len(digits) - len(digits.lstrip(b"0"))
        if self.digits + lead > _MAX_INT_DIGITS or b"0" * (_MAX_INT_DIGITS + 1) in digits:
            return True
        trail = len(digits) - len(digits.rstrip(b"0"))
        self.digits = self.digits + trail if trail == len(digits) else trail
        return False

    def _hand_on(self, data: bytes) -> None:
        self.out += data
        self.line += data.count(b"\n")
        self.blank = self.blank and not data.strip()


def _lone_surrogate(data: bytes) -> bool:
    """A \\uD800-\\uDFFF escape that is not half of a pair (a false alarm, on an escaped
    backslash followed by `ud800`, only costs speed)."""
    high_end = -1  # where the last high surrogate escape ended, waiting for its low half
    for match in _SURROGATE.finditer(data):
        if match.group()[2:3] in b"89abAB":
            if high_end != -1:
                return True
            high_end = match.end()
        elif match.start() != high_end:
            return True
        else:
            high_end = -1
    return high_end != -1


def _backend(fast: bool) -> Any:
    if fast:
        try:
            return ijson.get_backend("yajl2_c")
        except ImportError:
            pass
    return ijson.get_backend("python")


def read_records(path: Path, encoding: str, records: str | None) -> Iterator[RawRecord]:
    """Each element of the list at the dotted path `records` (the top level if None) as a
    record; what makes the rest unreadable ends the read with an invalid row saying so."""
    check_encoding(path, encoding)
    prefix = _records_prefix(path, encoding, records)
    given = 0
    for fast in (True, False):
        with _open(path) as raw:
            feed = _Feed(raw, encoding, fast)
            values = _backend(fast).items(feed, prefix, use_float=False)
            try:
                for value in itertools.islice(values, given, None):
                    given += 1
                    yield _record(given, value, fast)
                error: Exception | None = None
            except (ijson.JSONError, ValueError) as exc:  # yajl raises UnicodeDecodeError too
                error = exc
        stopped = feed.stop is not None and (error is None or _incomplete(error))
        if fast and (feed.unsafe or (error is not None and not stopped)):
            continue  # the pure-Python parser reads it right, or says where it is wrong
        if stopped or error is not None:
            line, why = feed.stop if stopped and feed.stop else _syntax(error, path, encoding,
                                                                        feed)
            yield RawRecord(given + 1, None, f"line {line}: {why}; {_STOPPED}")
        return


def _record(row: int, value: Any, fast: bool) -> RawRecord:
    if not isinstance(value, dict):
        return RawRecord(row, None, f"record is {json_type(value)}, not an object")
    problem = record_problem(value, text=not fast)  # the feed lets no lone surrogate by yajl
    return RawRecord(row, None, problem) if problem else RawRecord(row, value)


def _records_prefix(path: Path, encoding: str, records: str | None) -> str:
    """The ijson prefix of the records, once the document is known to have a list there;
    a problem before it is a SourceError (no record has been read)."""
    parts = [part for part in (records or "").split(".") if part]
    for fast in (True, False):
        with _open(path) as raw:
            feed = _Feed(raw, encoding, fast)
            try:
                return _find_list(path, _backend(fast).parse(feed), parts, records)
            except (ijson.JSONError, ValueError) as exc:
                if fast:
                    continue
                stopped = feed.stop is not None and _incomplete(exc)
                line, why = feed.stop if stopped and feed.stop else _syntax(exc, path,
                                                                           encoding, feed)
                raise SourceError(f"{path.name}: line {line}: {why}") from exc
    raise AssertionError("unreachable: the second pass returns or raises")


def _find_list(path: Path, events: Iterator[tuple[str, str, Any]], parts: list[str],
               records: str | None) -> str:
    wanted = [".".join(parts[:level]) for level in range(len(parts) + 1)]
    seen: set[str] = set()
    for prefix, event, _ in events:
        if prefix not in wanted or prefix in seen or event in ("map_key", "end_map",
                                                               "end_array"):
            continue
        seen.add(prefix)
        level = wanted.index(prefix)
        if level < len(parts) and event != "start_map":
            where = repr(prefix) if prefix else "the top level"
            raise SourceError(f"{path.name}: no field {parts[level]!r} on the path {records!r} "
                              f"({where} is {_event_type(event)})")
        if level == len(parts) and event != "start_array":
            where = f"at {records!r}" if parts else "at the top level"
            hint = "" if parts else " (set records: to the path of the list)"
            raise SourceError(f"{path.name}: expected a list of records {where}, found "
                              f"{_event_type(event)}{hint}")
        if level == len(parts):
            return f"{prefix}.item" if prefix else "item"
    raise SourceError(f"{path.name}: no field {parts[len(seen) - 1]!r} on the path {records!r}")


def _event_type(event: str) -> str:
    return {"start_map": "an object", "start_array": "a list", "null": "null",
            "boolean": "a boolean", "string": "a string"}.get(event, "a number")


def _incomplete(error: Exception) -> bool:
    """The parser ran out of bytes (the feed stopped, or the file ends early)."""
    return isinstance(error, ijson.IncompleteJSONError) and any(
        text in str(error) for text in ("premature EOF", "Incomplete JSON content"))


def _syntax(error: Exception | None, path: Path, encoding: str, feed: _Feed) -> tuple[int, str]:
    """(line, what is wrong) for an error of ijson's pure-Python parser."""
    message = str(error)
    symbol = re.fullmatch(r"Unexpected symbol '(.*)' at (\d+)", message, re.S)
    if symbol:
        text = symbol.group(1)
        line = _line_at(path, encoding, int(symbol.group(2)))
        if re.fullmatch(r"[-+0-9.eE]+", text) and len(text) > _MAX_INT_DIGITS:
            return line, f"a number with more than {_MAX_INT_DIGITS} digits"
        return line, f"invalid JSON: unexpected {text[:40]!r}"
    if error is not None and _incomplete(error):
        return feed.line, ("invalid JSON: the document is empty" if feed.blank
                           else "invalid JSON: the document ends in the middle of a value")
    if "Additional data" in message:
        return feed.line, "invalid JSON: more data after the end of the document"
    return feed.line, f"invalid JSON: {message[:200]}"


def _line_at(path: Path, encoding: str, chars: int) -> int:
    """The line of the character at offset `chars` of the document (after any BOM)."""
    utf8 = encoding.lower().replace("_", "-") in ("utf-8", "utf8", "utf-8-sig")
    with path.open(encoding="utf-8-sig" if utf8 else encoding, errors="replace",
                   newline="") as handle:
        line = 1
        while chars > 0 and (text := handle.read(min(chars, _BLOCK))):
            line += text.count("\n")
            chars -= len(text)
        return line


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError as exc:
        raise SourceError(f"file not found: {path}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
