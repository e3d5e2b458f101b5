"""Message content between DATA and the final dot: line endings, dot-unstuffing, long lines.

SMTP smuggling works when two servers disagree on where a message ends. Here only
``<CR><LF>.<CR><LF>`` ends it; every bare CR or bare LF (``\\n.\\n``, ``\\r.\\r\\n`` ...) is
either turned into CRLF (``bare_line_endings: normalize``, Postfix 3.9's default behaviour) or
makes the message refused (``reject``). Either way the spool only ever holds CRLF lines, so
what goes upstream cannot be split by Exchange Online or any hop after it, and aiosmtplib
escapes every leading dot on the way out.
"""

from __future__ import annotations

import functools
import re
from typing import TypeVar

# RFC 5322 2.1.1: at most 998 octets per line, without the CRLF (Postfix's
# smtp_line_length_limit default).
SMTP_LINE_LIMIT = 998

_EOL = re.compile(rb"\r\n|\r|\n")
# Anchored at line starts: unanchored, the engine retries from every byte of every short line,
# which cost seconds of event-loop time on a 30 MB scan.
_LONG_LINE = re.compile(rb"(?m)^[^\r\n]{%d,}" % (SMTP_LINE_LIMIT + 1))
_Bytes = TypeVar("_Bytes", bytes, bytearray, memoryview)


_BARE_CR = re.compile(rb"\r(?!\n)")


@functools.cache
def _crlf_lines(limit: int) -> re.Pattern[bytes]:
    """Matches a run of whole lines, each ending in CRLF with no LF inside and at most
    ``limit`` octets long (a CR inside is left to _BARE_CR). [^\\n] rather than [^\\r\\n]:
    sre scans a negated single byte several times faster than a class."""
    return re.compile(rb"(?:[^\n]{0,%d}\r\n)*+" % limit)


class DataAssembler:
    """Feed it what the client sends after ``354``; it keeps the content with CRLF lines.

    Segments are what ``readuntil(b"\\n")`` returns (a line with its LF), or a piece of a line
    too long for the stream buffer; :meth:`feed_lines` takes many whole lines at once. A bare
    CR or LF ends a line too, and every line is dot-unstuffed, as Postfix does for bare-LF
    lines. Once the message cannot be accepted (too big, a line too long, a bare line ending
    under ``reject``) the content is dropped and only counting continues, so a refused message
    costs no memory.
    """

    def __init__(self, *, max_size: int, max_line: int, normalize: bool) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.normalize = normalize
        self.content = bytearray()
        self.size = 0
        self.too_big = False
        self.too_long = False
        self.bare = False
        self._line_length = 0
        self._mid_line = False  # the last segment ended inside a line
        self._held_cr = False  # a segment ended in CR: CRLF or bare CR, the next one tells
        self._after_crlf = True  # the DATA command's own CRLF counts
        # The longest line kept, or more: a message whose lines all fit SMTP_LINE_LIMIT needs
        # no fold_long_lines() scan.
        self.longest = 0
        # Lines the block path takes as they are: no longer than the limit, nor than
        # SMTP_LINE_LIMIT, so `longest` needs no look at them.
        self._plain_lines = _crlf_lines(min(max_line, SMTP_LINE_LIMIT))

    @property
    def refused(self) -> bool:
        return self.too_big or self.too_long or (self.bare and not self.normalize)

    def feed(self, segment: bytes) -> bool:
        """Take the next bytes; True once they were the final ``.<CR><LF>`` (not kept)."""
        size = len(segment)
        plain = not (self._mid_line or self._held_cr)
        if plain and segment == b".\r\n" and self._after_crlf:
            return True
        self.size += size
        if self.max_size and self.size > self.max_size:
            self.too_big = True
        if plain and segment[-2:] == b"\r\n" and segment.find(b"\r") == size - 2:
            # The common case, kept cheap for 35 MB messages: one whole CRLF line.
            self._after_crlf = True
            if segment[:1] == b".":
                segment = segment[1:]
                size -= 1
            if size - 2 > self.longest:
                self.longest = size - 2
                if size - 2 > self.max_line:
                    self.too_long = True
            if self.refused:
                self.content.clear()
            else:
                self.content += segment
            return False
        if self._held_cr:
            segment = b"\r" + segment
            self._held_cr = False
        if segment.endswith(b"\r"):
            segment = segment[:-1]
            self._held_cr = True
        start = 0
        for match in _EOL.finditer(segment):
            self._line(segment[start:match.start()], match.group())
            start = match.end()
        if start < len(segment):
            self._line(segment[start:], None)
        return False

    def feed_lines(self, block: bytes) -> bool:
        """Take whole lines at once, as :meth:`feed` would take them one by one: ``block``
        ends with an LF and only its last line may be ``.<CR><LF>`` after an LF (as
        :meth:`relay.ingress.smtpbase.DataReader.take_lines` cuts it). True once that line ended the
        data."""
        end = len(block)
        last = block.endswith(b".\r\n") and (end == 3 or block[end - 4] == 0x0A)
        if last:
            end -= 3
        plain_lines = self._plain_lines
        start = 0
        run = 0  # where the lines plain_lines matched end; each byte is scanned once
        while start < end:
            if self._after_crlf and not (self._mid_line or self._held_cr):
                if run <= start:
                    run = plain_lines.match(block, start, end).end()  # type: ignore[union-attr]
                stop = run
                bare = _BARE_CR.search(block, start, run)
                if bare is not None:  # up to the line it is in
                    stop = block.rfind(b"\n", start, bare.start()) + 1 or start
                if stop > start:  # the common case, in one piece
                    self._take(block, start, stop)
                    start = stop
                    continue
            # A line with a bare CR or LF, a long one, or the rest of a partial one: alone.
            stop = block.index(b"\n", start, end) + 1
            if self.feed(block[start:stop]):
                raise ValueError("the end of data can only be the last line of a block")
            start = stop
        return last and self.feed(b".\r\n")

    def _take(self, block: bytes, start: int, stop: int) -> None:
        """Whole CRLF lines, each at most max_line octets before dot-unstuffing."""
        self.size += stop - start
        if self.max_size and self.size > self.max_size:
            self.too_big = True
        if self.refused:
            self.content.clear()
            return
        if block[start] == 0x2E:  # "."
            start += 1
        lines = block[start:stop]  # the whole block, usually: the same object, no copy
        self.content += lines.replace(b"\n.", b"\n")  # dot-unstuffing; no copy without dots

    def _line(self, text: bytes, ending: bytes | None) -> None:
        if not self._mid_line and text.startswith(b"."):
            text = text[1:]
        self._line_length += len(text)
        if self._line_length > self.longest:
            self.longest = self._line_length
            if self._line_length > self.max_line:
                self.too_long = True
        if ending is None:
            self._mid_line = True
        else:
            self._mid_line = False
            self._line_length = 0
            self._after_crlf = ending == b"\r\n"
            if not self._after_crlf:
                self.bare = True
        if self.refused:
            self.content.clear()
            return
        self.content += text
        if ending is not None:
            self.content += b"\r\n"


def fold_long_lines(data: _Bytes, limit: int = SMTP_LINE_LIMIT) -> _Bytes | bytes:
    """Break lines longer than ``limit`` octets so every hop accepts them.

    As Postfix's ``smtp_line_length_limit``: a break is CRLF followed by white space, which
    for a header is plain folding (RFC 5322 2.2.3) and in a body is the least damaging change
    available without re-encoding. The break goes before existing white space when the line
    has some (nothing is added then, HTML and URLs stay intact), otherwise CRLF + SPACE is
    inserted at the limit, never inside a UTF-8 sequence. A continuation line starts with
    white space, so it can never be a lone dot. ``data`` must already have CRLF line ends;
    it is returned as it is (the same object) when no line is too long. A message split at a
    line boundary can be folded piece by piece.
    """
    if _LONG_LINE.search(data) is None:
        return data
    return _LONG_LINE.sub(lambda match: _fold(bytes(match.group()), limit), data)


def _fold(line: bytes, limit: int) -> bytes:
    pieces = []
    while len(line) > limit:
        cut = max(line.rfind(b" ", 1, limit + 1), line.rfind(b"\t", 1, limit + 1))
        if cut > 0:
            pieces.append(line[:cut])
            line = line[cut:]
            continue
        cut = limit
        while cut > limit - 3 and 0x80 <= line[cut] < 0xC0:  # a UTF-8 continuation byte
            cut -= 1
        pieces.append(line[:cut])
        line = b" " + line[cut:]
    pieces.append(line)
    return b"\r\n".join(pieces)
