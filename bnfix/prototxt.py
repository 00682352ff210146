"""A lossless editor for Caffe prototxt (protobuf text format), cut down to what bnfix edits.

The input text is the only source of truth (tomlkit's rule): messages and fields only remember
spans of it, and the output is the original text with splices applied.  A document with no edits
renders to exactly its input, line endings, comments, odd quoting and unknown layer types
included, because nothing is ever re-serialised.

What is parsed: the whole text-format grammar that Caffe files use (``name: value``,
``name { ... }``, ``name: { ... }``, ``< >`` messages, ``[a, b]`` lists, ``,``/``;``
separators, adjacent string concatenation, ``#`` comments).  What is interpreted: top-level
``layer`` blocks, their ``name``, ``type``, ``bottom``/``top``, ``include``/``exclude`` phases and
the scalar fields of their parameter blocks.  Everything else is carried as spans.

bnfix must see what Caffe sees, so the lexical rules are those of protobuf's C++ tokenizer
(``io/tokenizer.cc``), which Caffe's ``TextFormat::Parse`` uses:

- A ``#`` comment ends only at a line feed.  In a file whose lines end with a lone ``\\r`` a
  comment therefore runs to the end of the file; :attr:`Document.comment_needs_lf` tells an
  editor that a comment it appends must end with its own ``\\n``.
- Strings are unescaped as ``Tokenizer::ParseStringAppend`` does; an escape that protobuf
  rejects, or that protobuf versions read differently (``\\X``, ``\\U`` above ``0010FFFF``), is a
  :class:`~bnfix.errors.ParseError` naming file:line:col.
- Nesting has no limit (protobuf's default recursion limit is INT_MAX), so the parser keeps an
  explicit stack instead of recursing.

For bnfix's own line arithmetic (where an edit goes, error positions) ``\\r\\n``, ``\\n`` and a
lone ``\\r`` all end a line, so LF, CRLF and CR-only files are edited alike.

Speed: one regular-expression match consumes a whole ``name: value`` field or ``name {`` opener
with its leading whitespace (most of a Caffe file); anything else (lists, comments inside a
field, errors) goes through a token-at-a-time path that accepts the same language.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from .errors import ParseError
from .files import read_regular

__all__ = ["Document", "Field", "Layer", "Message", "Splice", "Token", "parse", "read"]

# -- lexical grammar ---------------------------------------------------------------------------
# Whitespace is protobuf's (ASCII only: Python's \s would also skip \x1c-\x1f and U+00A0).
_W = r"[ \t\n\r\f\v]"
_IDENT = r"[-+]?[A-Za-z_][A-Za-z0-9_.]*"
_NUMBER = r"[-+]?(?:0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[fF]?)"
# The escapes every protobuf C++ version reads the same way (their values: _unescape_literal).
_ESCAPE = r"""\\(?:[abfnrtv\\?'"0-7]|x[0-9a-fA-F]|u[0-9a-fA-F]{4}|U00(?:0[0-9a-fA-F]|10)[0-9a-fA-F]{4})"""


def _quoted(q: str, excluded: str) -> str:
    """A valid string literal in quote ``q``: no line feed, NUL (protobuf's end marker) or
    ``excluded`` character unescaped, only valid escapes (the unrolled-loop form, fast in re)."""
    plain = rf"[^{q}\\\n\x00{excluded}]*"
    return f"{q}{plain}(?:{_ESCAPE}{plain})*{q}"


_STRING = f"{_quoted(chr(34), '')}|{_quoted(chr(39), '')}"
# The fast path leaves strings holding a raw CR to the token path, which records them (_opaque).
_STRING_FAST = f"(?:{_quoted(chr(34), chr(13))}|{_quoted(chr(39), chr(13))})"
# To a line feed (not included), NUL or the end; a CR just before the LF stays outside, so a
# CRLF file's comments are the same tokens as an LF file's.
_COMMENT = r"\#[^\r\n\x00]*(?:\r(?!\n)[^\r\n\x00]*)*"

_TOKEN = re.compile(
    f"{_W}*(?:(?P<ident>{_IDENT})|(?P<punct>[{{}}\\[\\]<>:,;/])|(?P<string>{_STRING})"
    f"|(?P<number>{_NUMBER})|(?P<comment>{_COMMENT})|(?P<end>\\Z)|(?P<bad>.))",
    re.DOTALL,
)
# The fast path: group 2 is the field name, group 3 a scalar value, groups 4/5 an opening brace.
# A string value followed by a comment or another string takes the token path (concatenation
# across a comment), as does everything this pattern does not match.
_FAST = re.compile(
    f"{_W}*(?:(?P<field>({_IDENT}){_W}*(?::{_W}*(?:({_NUMBER}|{_IDENT}|{_STRING_FAST}(?:{_W}*{_STRING_FAST})*"
    f"(?!{_W}*[\"'#]))|([{{<]))|([{{<])))|(?P<close>[}}>])|(?P<sep>[,;])|(?P<comment>{_COMMENT}))"
)
_BREAK = re.compile(r"\r\n?|\n")
_CLOSE = {"{": "}", "<": ">"}


class Token(NamedTuple):
    """A slice of the text: ``kind`` is comment, string, number, ident or punct."""

    kind: str
    start: int
    end: int
    text: str


class Splice(NamedTuple):
    """Replace ``text[start:end]``; among insertions at one offset, lower ``order`` goes first."""

    start: int
    end: int
    text: str
    order: int = 0


class Message:
    """A ``{ ... }`` block: offsets of its braces (-1 and len(text) for the document)."""

    __slots__ = ("close", "fields", "open")

    def __init__(self, open_: int, close: int):
        self.open, self.close = open_, close
        self.fields: list[Field] = []

    def all(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]

    def first(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


class Field:
    """``name: value``, ``name: [list]`` or ``name { ... }``; spans are offsets into the text.

    ``end`` is one past the value; ``vstart`` is where the value starts (its first token, the
    ``[`` of a list or the opening brace).  The value's tokens are re-read from the text when
    first asked for: most fields of a network are never looked at.
    """

    __slots__ = ("_groups", "_text", "end", "name", "start", "value", "vstart")

    def __init__(self, name: str, start: int, end: int, value: Message | None, vstart: int, text: str):
        self.name, self.start, self.end, self.value, self.vstart, self._text = name, start, end, value, vstart, text

    @property
    def value_tokens(self) -> list[Token]:
        """The scalar tokens of the value, in order (all elements of a list; none for a block)."""
        return [t for group in self.groups() for t in group]

    def groups(self) -> list[list[Token]]:
        """The value's elements: one for a scalar (adjacent strings are one element), one per
        value for a list, none for a block.  Messages inside a list are skipped."""
        try:
            return self._groups
        except AttributeError:
            self._groups: list[list[Token]] = [] if self.value is not None else _value_groups(
                self._text, self.vstart, self.end)
            return self._groups


def _value_groups(text: str, start: int, end: int) -> list[list[Token]]:
    groups: list[list[Token]] = []
    depth, pos, last = 0, start, ""
    while True:
        m = _TOKEN.match(text, pos, end)
        kind = (m.lastgroup or "end") if m else "end"
        if m is None or kind == "end":
            return groups
        pos = m.end()
        if kind == "comment":
            continue
        s, e = m.span(kind)
        t = text[s:e]
        if kind == "punct":
            depth += (t in "{<") - (t in "}>")
            last = ""
        elif depth == 0:
            tok = Token(kind, s, e, t)
            if kind == "string" and last == "string":
                groups[-1].append(tok)
            else:
                groups.append([tok])
            last = kind


# -- escapes -------------------------------------------------------------------------------------
_SIMPLE = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, "?": 63, "'": 39, '"': 34}
_ESC_PART = re.compile(r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|([uU])|(.))", re.DOTALL)
_HEX4 = re.compile(r"\\u([0-9a-fA-F]{4})")


def _unescape_literal(body: str) -> bytes:
    """The bytes of one literal's body.  \\u and \\U escapes consume a variable number of
    characters, so the body is walked escape by escape rather than with one finditer."""
    out = bytearray()
    pos, n = 0, len(body)
    while pos < n:
        bs = body.find("\\", pos)
        if bs < 0:
            out += body[pos:].encode("utf-8", "surrogateescape")
            break
        out += body[pos:bs].encode("utf-8", "surrogateescape")
        m = _ESC_PART.match(body, bs)
        assert m is not None  # a backslash is always followed by something in a valid literal
        octal, hex_, uni, simple = m.groups()
        pos = m.end()
        if octal is not None:
            out.append(int(octal, 8) & 0xFF)  # protobuf keeps the low byte of \400-\777
        elif hex_ is not None:
            out.append(int(hex_, 16))
        elif uni is not None:
            width = 4 if uni == "u" else 8
            code = int(body[pos : pos + width], 16)
            pos += width
            if 0xD800 <= code < 0xDC00:  # a UTF-16 head surrogate takes a \u trail surrogate
                trail = _HEX4.match(body, pos)
                if trail and 0xDC00 <= int(trail[1], 16) < 0xE000:
                    code = 0x10000 + ((code - 0xD800) << 10 | (int(trail[1], 16) - 0xDC00))
                    pos = trail.end()
            out += chr(code).encode("utf-8", "surrogatepass")  # a lone surrogate as protobuf writes it
        else:
            out.append(_SIMPLE[simple])
    return bytes(out)


_VALID_U = re.compile(r"u[0-9a-fA-F]{4}|U00(?:0[0-9a-fA-F]|10)[0-9a-fA-F]{4}")


def _string_error(text: str, quote: int) -> tuple[int, str]:
    """Why the literal opened at ``quote`` did not match: (offset, message)."""
    q, i, n = text[quote], quote + 1, len(text)
    while i < n and text[i] != q:
        c = text[i]
        if c == "\n":
            break
        if c == "\x00":
            return i, "NUL character in a string"
        if c == "\\":
            e = text[i + 1] if i + 1 < n else ""
            if e in ("", "\n", "\r"):
                break
            if e in "abfnrtv\\?'\"01234567":
                i += 2
                continue
            if e == "x":
                if i + 2 < n and text[i + 2] in "0123456789abcdefABCDEF":
                    i += 3
                    continue
                return i, 'escape "\\x" without a hex digit'
            valid_u = _VALID_U.match(text, i + 1)
            if valid_u:
                i = valid_u.end()
                continue
            if e == "X":
                return i, 'escape "\\X" is read differently by protobuf versions (write "\\x")'
            if e == "u":
                return i, 'escape "\\u" needs 4 hex digits'
            if e == "U":
                return i, 'escape "\\U" needs 8 hex digits, at most 0010FFFF'
            shown = e if e.isprintable() and e != " " else ascii(e)[1:-1]
            return i, f'unknown escape "\\{shown}" in a string'
        i += 1
    return quote, "unterminated string"


# -- the parser ------------------------------------------------------------------------------------


# An open block on the parser's stack: its message (None for a ``[ ... ]`` list), the field it
# is the value of (None for the document and for a message inside a list), and the closing
# bracket ("" for the document).  A plain tuple: one is made for every block of the file.
_Frame = tuple["Message | None", "Field | None", str]


class _Parser:
    """Iterative: the open blocks are an explicit stack, so nesting depth is only memory.

    ``run`` alternates the fast field-at-a-time loop and single steps of the token path, which
    accepts the whole language on its own (``fast=False``, used by the tests as a reference).
    """

    def __init__(self, doc: Document):
        self.doc, self.text = doc, doc.text
        self.root = Message(-1, len(self.text))
        self.stack: list[_Frame] = []
        self.msg: Message | None = self.root
        self.field: Field | None = None
        self.closer = ""
        self.sep_ok = False
        self.pos = 0
        self.done = False
        self.comments: list[tuple[int, int]] = []
        self.opaque: list[tuple[int, int]] = []  # strings and comments holding a lone CR

    def run(self, fast: bool = True) -> Message:
        while not self.done:
            if fast and self.closer != "]":
                self._fast()
            self._step()
        return self.root

    # The fast loop keeps its state in locals and writes it back when it stops.
    def _fast(self) -> None:
        text, match, error = self.text, _FAST.match, self.doc.error
        stack, msg, field, closer, sep_ok, pos = self.stack, self.msg, self.field, self.closer, self.sep_ok, self.pos
        assert msg is not None
        append = msg.fields.append
        while True:
            m = match(text, pos)
            if m is None:
                break
            kind = m.lastgroup
            pos = m.end()
            if kind == "field":
                vs = m.start(3)
                if vs >= 0:
                    append(Field(m[2], m.start(2), pos, None, vs, text))
                    sep_ok = True
                else:
                    child = Message(pos - 1, -1)
                    f = Field(m[2], m.start(2), -1, child, pos - 1, text)
                    append(f)
                    stack.append((msg, field, closer))
                    msg, field, closer, sep_ok = child, f, "}" if text[pos - 1] == "{" else ">", False
                    append = child.fields.append
            elif kind == "close":
                if text[pos - 1] != closer:
                    raise error(pos - 1, f"unexpected '{text[pos - 1]}' (no block to close)")
                msg.close = pos - 1
                if field is not None:
                    field.end = pos
                msg, field, closer = stack.pop()
                sep_ok = True
                if msg is None:  # back inside a list: the token path takes over
                    break
                append = msg.fields.append
            elif kind == "sep":
                if not sep_ok:
                    raise error(pos - 1, f"expected a field name, found {text[pos - 1]!r}")
                sep_ok = False
            else:
                self._comment(m.start("comment"), pos)
        self.msg, self.field, self.closer, self.sep_ok, self.pos = msg, field, closer, sep_ok, pos

    # -- the token path ---------------------------------------------------------------------------
    def _comment(self, start: int, end: int) -> None:
        if not self.comments or start > self.comments[-1][0]:  # a token seen twice (peeked) counts once
            self.comments.append((start, end))
            if "\r" in self.text[start:end]:
                self._opaque(start, end)

    def _opaque(self, start: int, end: int) -> None:
        if not self.opaque or start > self.opaque[-1][0]:
            self.opaque.append((start, end))

    def _next(self, pos: int) -> tuple[str, int, int]:
        """The next token at or after ``pos`` that is not a comment: (kind, start, end)."""
        text = self.text
        while True:
            m = _TOKEN.match(text, pos)
            assert m is not None  # ``bad`` matches any character and ``end`` the end
            kind = m.lastgroup or ""
            start, end = m.span(kind)
            if kind == "comment":
                self._comment(start, end)
                pos = end
                continue
            if kind == "bad":
                if text[start] in "\"'":
                    raise self.doc.error(*_string_error(text, start))
                raise self.doc.error(start, f"unexpected character {text[start]!r}")
            if kind == "string" and "\r" in text[start:end]:
                self._opaque(start, end)
            return kind, start, end

    def _push(self, msg: Message | None, field: Field | None, closer: str, pos: int) -> None:
        self.stack.append((self.msg, self.field, self.closer))
        self.msg, self.field, self.closer, self.sep_ok, self.pos = msg, field, closer, False, pos

    def _pop(self, end: int) -> None:
        if self.field is not None:
            self.field.end = end
        self.msg, self.field, self.closer = self.stack.pop()
        self.sep_ok, self.pos = True, end

    def _scalar(self, kind: str, start: int, end: int) -> int:
        """Check a value token; return the end of the value (adjacent strings concatenate)."""
        if kind not in ("string", "number", "ident"):
            raise self.doc.error(start, f"expected a value, found {self.text[start:end]!r}")
        while kind == "string":
            kind, _, e = self._next(end)
            if kind == "string":
                end = e
        return end

    def _step(self) -> None:
        """One token-level step: a whole scalar field, an opening or closing bracket, or a list
        element.  Raises the error of whatever is wrong at the current position."""
        if self.closer == "]":
            return self._list_step()
        text, error = self.text, self.doc.error
        msg = self.msg
        assert msg is not None
        kind, s, e = self._next(self.pos)
        t = text[s:e]
        if kind == "end":
            if self.stack:
                raise error(msg.open, f"'{text[msg.open]}' is never closed")
            self.done = True
            return
        if kind == "punct" and t in "}>":
            if t != self.closer:
                raise error(s, f"unexpected '{t}' (no block to close)")
            msg.close = s
            return self._pop(e)
        if kind == "punct" and t in ",;" and self.sep_ok:
            self.sep_ok, self.pos = False, e
            return
        if kind == "punct" and t == "[":  # [extension.name] or [type.url/Name]
            name_end = e
            while True:
                k, _, name_end = self._next(name_end)
                if k == "end":
                    raise error(s, "'[' is never closed")
                if text[name_end - 1] == "]" and k == "punct":
                    break
            name = text[s:name_end]
        elif kind == "ident":
            name, name_end = t, e
        else:
            raise error(s, f"expected a field name, found {t!r}")
        kind, vs, ve = self._next(name_end)
        colon = kind == "punct" and text[vs:ve] == ":"
        if colon:
            kind, vs, ve = self._next(ve)
        if kind == "end":
            raise error(s, f"field {name!r} has no value")
        v = text[vs:ve]
        if kind == "punct" and v in _CLOSE:
            child = Message(vs, -1)
            f = Field(name, s, -1, child, vs, text)
            msg.fields.append(f)
            return self._push(child, f, _CLOSE[v], ve)
        if not colon:
            raise error(vs, f"expected ':' or '{{' after {name!r}, found {v!r}")
        if kind == "punct" and v == "[":
            f = Field(name, s, -1, None, vs, text)
            msg.fields.append(f)
            return self._push(None, f, "]", ve)
        end = self._scalar(kind, vs, ve)
        msg.fields.append(Field(name, s, end, None, vs, text))
        self.sep_ok, self.pos = True, end

    def _list_step(self) -> None:
        text = self.text
        kind, s, e = self._next(self.pos)
        t = text[s:e]
        if kind == "end":
            assert self.field is not None
            raise self.doc.error(self.field.vstart, "'[' is never closed")
        if kind == "punct" and t == "]":
            return self._pop(e)
        if kind == "punct" and t == ",":
            self.pos = e
        elif kind == "punct" and t in _CLOSE:  # a message inside a list: parsed, not kept
            self._push(Message(s, -1), None, _CLOSE[t], e)
        else:
            self.pos = self._scalar(kind, s, e)


# -- numbers and booleans as protobuf's TextFormat reads them ------------------------------------
# ConsumeDouble: an optional '-', then a decimal integer (hex and octal are refused), a float,
# or inf/infinity/nan in any case.  ConsumeSignedInteger: '-' and an integer in any base.
_FLOAT_TEXT = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?)[fF]?")
_DECIMAL = re.compile(r"-?[0-9]+")
_INTEGER = re.compile(r"(-?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))")
_SPECIAL = {"inf": float("inf"), "infinity": float("inf"), "nan": float("nan")}
_TRUE, _FALSE = ("true", "True", "t"), ("false", "False", "f")


def _float_value(text: str) -> float | None:
    if _FLOAT_TEXT.fullmatch(text):
        if _DECIMAL.fullmatch(text) and int(text.lstrip("-")) >= 1 << 64:
            return None  # "Integer out of range" in protobuf
        return float(text.rstrip("fF"))
    special = _SPECIAL.get(text.lstrip("-").lower()) if text.count("-") <= 1 else None
    if special is None:
        return None
    return -special if text.startswith("-") else special


def _int_value(text: str, low: int, high: int) -> int | None:
    m = _INTEGER.fullmatch(text)
    if m is None:
        return None
    sign, hex_, octal, dec = m.groups()
    value = int(hex_, 16) if hex_ else int(octal, 8) if octal else int(dec)
    value = -value if sign else value
    return value if low <= value <= high else None


# -- the document ----------------------------------------------------------------------------------


class Document:
    """A parsed prototxt: the text and its message tree, plus line arithmetic for editors."""

    def __init__(self, text: str, path: str = "<prototxt>", *, _fast: bool = True):
        self.text = text
        self.path = path
        self._cr = "\r" in text  # lone CRs or CRLF: the general line arithmetic
        self._opaque_starts: list[int] = []
        self._opaque_ends: list[int] = []
        parser = _Parser(self)
        self.root = parser.run(_fast)
        self._comments = [Token("comment", s, e, text[s:e]) for s, e in parser.comments]
        self._comment_starts = [s for s, _ in parser.comments]
        self._opaque_starts = [s for s, _ in parser.opaque]
        self._opaque_ends = [e for _, e in parser.opaque]
        self._layers: list[Layer] | None = None

    @cached_property
    def newline(self) -> str:
        """The file's dominant line break, "\\n", "\\r\\n" or "\\r" (ties go to LF, then CRLF)."""
        crlf = self.text.count("\r\n")
        lf, cr = self.text.count("\n") - crlf, self.text.count("\r") - crlf
        return "\r" if cr > max(lf, crlf) else "\r\n" if crlf > lf else "\n"

    @property
    def comment_needs_lf(self) -> bool:
        """Whether a ``#`` comment appended to a line must end with its own ``\\n``: protobuf
        ends comments only at a line feed, so in a CR-only file a comment written before a lone
        ``\\r`` would hide the rest of the file from Caffe.  (:meth:`line_break_at` gives the
        exact answer for one line of a file with mixed line endings.)"""
        return self.newline == "\r"

    @cached_property
    def tokens(self) -> list[Token]:
        """Every token of the text, comments included (built on first use; the parser does not
        need them)."""
        out: list[Token] = []
        pos, text = 0, self.text
        while True:
            m = _TOKEN.match(text, pos)
            assert m is not None
            kind = m.lastgroup or ""
            if kind in ("end", "bad"):
                return out
            s, pos = m.span(kind)
            out.append(Token(kind, s, pos, text[s:pos]))

    # -- positions ------------------------------------------------------------------------
    def where(self, offset: int) -> str:
        """``path:line:col`` (1-based), counting lines as an editor does: every ``\\r\\n``,
        ``\\n`` and lone ``\\r`` ends one."""
        text = self.text
        if not self._cr:
            line = text.count("\n", 0, offset) + 1
            start = text.rfind("\n", 0, offset) + 1
        else:
            inside = 0 < offset < len(text) and text[offset] == "\n" and text[offset - 1] == "\r"
            cut = offset - 1 if inside else offset  # an offset inside a CRLF belongs to its line
            line = text.count("\n", 0, cut) + text.count("\r", 0, cut) - text.count("\r\n", 0, cut) + 1
            start = max(text.rfind("\n", 0, cut), text.rfind("\r", 0, cut)) + 1
        return f"{self.path}:{line}:{offset - start + 1}"

    def error(self, offset: int, message: str) -> ParseError:
        return ParseError(f"{self.where(offset)}: {message}")

    def _opaque_span(self, offset: int) -> tuple[int, int] | None:
        """The string or comment token that holds ``offset`` strictly inside, if it holds a CR."""
        i = bisect.bisect_right(self._opaque_starts, offset) - 1
        if i >= 0 and self._opaque_starts[i] < offset < self._opaque_ends[i]:
            return self._opaque_starts[i], self._opaque_ends[i]
        return None

    # Line breaks for editing: "\r\n", "\n" or a lone "\r", except a lone "\r" inside a string
    # or a comment, which Caffe does not see as a line break: an edit never lands inside one.
    def line_start(self, offset: int) -> int:
        text = self.text
        if not self._cr:
            return text.rfind("\n", 0, offset) + 1
        end = offset
        while True:
            b = max(text.rfind("\n", 0, end), text.rfind("\r", 0, end))
            if b < 0:
                return 0
            if text[b] == "\r":
                if b + 1 == offset and text.startswith("\n", offset):  # offset inside a CRLF
                    end = b
                    continue
                span = self._opaque_span(b)
                if span is not None:
                    end = span[0]
                    continue
            return b + 1

    def line_end(self, offset: int) -> int:
        """Offset of the line break ending this line (before ``\\r\\n``), or len(text)."""
        text = self.text
        if not self._cr:
            end = text.find("\n", offset)
            return len(text) if end < 0 else end
        pos = offset
        while True:
            m = _BREAK.search(text, pos)
            if m is None:
                return len(text)
            b = m.start()
            if text[b] == "\n" and b == offset and b > 0 and text[b - 1] == "\r":
                return b - 1  # offset inside a CRLF
            if m.end() == b + 1 and text[b] == "\r":
                span = self._opaque_span(b)
                if span is not None:
                    pos = span[1]
                    continue
            return b

    def line_break_at(self, offset: int) -> str:
        """The line break that ends the line holding ``offset``: "\\n", "\\r\\n", "\\r" or ""
        at the end of the text."""
        end = self.line_end(offset)
        return _BREAK.match(self.text, end)[0] if end < len(self.text) else ""  # type: ignore[index]

    def same_line(self, a: int, b: int) -> bool:
        lo, hi = min(a, b), max(a, b)
        return self.line_end(lo) >= hi

    def indent_of(self, offset: int) -> str | None:
        """The whitespace before ``offset`` on its line, or None if anything else precedes it."""
        before = self.text[self.line_start(offset) : offset]
        return before if before.strip(" \t\f\v") == "" else None

    # -- values ---------------------------------------------------------------------------
    def scalar(self, f: Field) -> str:
        """The value text of a scalar field (strings keep their quotes)."""
        if f.value is None and f.end > f.vstart and self.text[f.vstart] not in "\"'[":
            return self.text[f.vstart : f.end]  # one number or identifier token
        return "".join(t.text for t in f.value_tokens)

    def string(self, f: Field | None) -> str | None:
        """A string field's value as Caffe reads it: adjacent literals concatenated, escapes
        resolved as protobuf does, the bytes decoded as UTF-8 with ``surrogateescape`` (so a
        non-UTF-8 byte compares equal to a caffemodel name decoded the same way).  An enum or
        number is returned as written; a block gives None."""
        if f is None or f.value is not None:
            return None
        text = self.text
        vs, end = f.vstart, f.end
        q = text[vs]
        if q in "\"'" and end - vs >= 2 and text[end - 1] == q and text.find(q, vs + 1, end - 1) < 0 \
                and text.find("\\", vs, end) < 0:
            return text[vs + 1 : end - 1]  # one literal, no escapes: the common case
        toks = f.value_tokens
        if not toks or any(t.kind != "string" for t in toks):
            return self.scalar(f)
        out = bytearray()
        for t in toks:
            out += _unescape_literal(t.text[1:-1])
        return out.decode("utf-8", "surrogateescape")

    def comments_between(self, start: int, end: int) -> list[Token]:
        lo = bisect.bisect_left(self._comment_starts, start)
        hi = bisect.bisect_left(self._comment_starts, end)
        return self._comments[lo:hi]

    # -- layers ---------------------------------------------------------------------------
    def layers(self) -> list[Layer]:
        """The top-level ``layer { ... }`` blocks in file order (built once; a fresh list)."""
        if self._layers is None:
            self._layers = [Layer(self, f, i) for i, f in enumerate(self.root.all("layer")) if f.value]
        return list(self._layers)

    def render(self, splices: Sequence[Splice], start: int = 0, end: int | None = None) -> str:
        """``text[start:end]`` with the splices applied (they must lie inside and not overlap).

        No splices gives the input back: the output is the input text, cut and rejoined.
        """
        end = len(self.text) if end is None else end
        out, pos = [], start
        for sp in sorted(splices, key=lambda s: (s.start, s.end, s.order)):
            if sp.start < pos or sp.end > end:
                raise AssertionError(f"overlapping or misplaced edit at {self.where(sp.start)}")
            out += [self.text[pos : sp.start], sp.text]
            pos = sp.end
        out.append(self.text[pos:end])
        return "".join(out)

    def check_splices(self, splices: Sequence[Splice], layers: Sequence[Layer]) -> list[Layer]:
        """Prove that ``splices`` keep the document's structure, re-reading only edited lines.

        Every splice must lie on the lines of one of ``layers``.  The lines of each edited
        layer (widened to whole top-level fields that share a line with it) are rendered with
        their splices and parsed together, once; they must give the same top-level fields, and
        the same layers (name and type), as before.  Text outside those lines is copied
        untouched by :meth:`render`, so this proves the whole file.

        Returns the layers as they read after the edits, aligned with ``layers`` (a layer whose
        lines were not edited is returned as it is).  A re-read layer belongs to a document of
        the edited lines only: its offsets are not this document's.  Raises AssertionError (a
        bnfix bug, never the user's input) when a splice is misplaced or changes the structure.
        """
        edited = self._edited_regions(splices, self._regions(layers))
        if not edited:
            return list(layers)
        pieces = [self.render(inside, a, b) for a, b, inside in edited]
        try:
            after = Document("\n".join(pieces), self.path)
        except ParseError as exc:
            bad = next((a for (a, _, _), p in zip(edited, pieces) if not _parses(p)), edited[0][0])
            raise AssertionError(f"internal error: the edit at {self.where(bad)} breaks the prototxt ({exc})") from None
        before = [f for a, b, _ in edited for f in self._top_fields(a, b)]
        if [f.name for f in before] != [f.name for f in after.root.fields]:
            raise AssertionError(f"internal error: the edit at {self.where(edited[0][0])} changed the top-level fields")
        old_of = {lay.field.start: lay for lay in self.layers()}
        new_of: dict[int, Layer] = {}  # old layer start -> the layer re-read from the edited lines
        for old_f, new_f in zip(before, after.root.fields):
            if old_f.name != "layer" or old_f.value is None:
                continue
            old = old_of[old_f.start]
            new = Layer(after, new_f, -1) if new_f.value is not None else None
            if new is None or (new.name, new.type) != (old.name, old.type):
                raise AssertionError(f"internal error: the edit at {self.where(old_f.start)} changed the layers")
            new_of[old_f.start] = new
        out = []
        for layer in layers:
            new = new_of.get(layer.field.start)
            if new is not None:
                new.index = layer.index
            out.append(layer if new is None else new)
        return out

    def _edited_regions(self, splices: Sequence[Splice], regions: list[tuple[int, int]]
                        ) -> list[tuple[int, int, list[Splice]]]:
        """The regions that hold splices, each with its splices; every splice must lie inside one."""
        todo = sorted(splices, key=lambda sp: (sp.start, sp.end))
        edited, i = [], 0
        for a, b in regions:
            inside = []
            if i < len(todo) and todo[i].start < a:
                break
            while i < len(todo) and todo[i].start <= b:
                if todo[i].end > b:
                    where = self.where(todo[i].start)
                    raise AssertionError(f"internal error: edit across the end of a layer at {where}")
                inside.append(todo[i])
                i += 1
            if inside:
                edited.append((a, b, inside))
        if i < len(todo):
            raise AssertionError(f"internal error: edit outside the given layers at {self.where(todo[i].start)}")
        return edited

    @cached_property
    def _top_starts(self) -> list[int]:
        return [f.start for f in self.root.fields]

    def _top_fields(self, a: int, b: int) -> list[Field]:
        fields = self.root.fields
        lo = bisect.bisect_left(self._top_starts, a)
        out = []
        for f in fields[lo:]:
            if f.start > b:
                break
            out.append(f)
        return out

    def _regions(self, layers: Sequence[Layer]) -> list[tuple[int, int]]:
        """Whole-line spans covering ``layers``, widened to every top-level field sharing a line
        with them and merged where they meet; sorted."""
        fields, starts = self.root.fields, self._top_starts
        spans = sorted((self.line_start(lay.field.start), self.line_end(lay.field.end)) for lay in layers)
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            while True:  # widen to the top-level fields that begin or end on these lines
                i = bisect.bisect_right(starts, a) - 1
                j = bisect.bisect_right(starts, b) - 1
                na, nb = a, b
                if i >= 0 and fields[i].end > a:
                    na = self.line_start(fields[i].start)
                if j >= 0 and fields[j].end > b:
                    nb = self.line_end(fields[j].end)
                if (na, nb) == (a, b):
                    break
                a, b = na, nb
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged


def _parses(text: str) -> bool:
    try:
        Document(text)
    except ParseError:
        return False
    return True


class Layer:
    """A ``layer { ... }`` block of the document, with the few facts bnfix needs."""

    __slots__ = ("_at_test", "_bottoms", "_tops", "body", "doc", "field", "index", "name", "type")

    def __init__(self, doc: Document, f: Field, index: int):
        assert f.value is not None
        self.doc, self.field, self.body, self.index = doc, f, f.value, index
        self.name = doc.string(self.body.first("name")) or ""
        self.type = doc.string(self.body.first("type")) or ""
        # Read on first use, once: pairing asks for them of many layers, many times.
        self._at_test: bool | None = None
        self._bottoms: list[str] | None = None
        self._tops: list[str] | None = None

    @property
    def runs_at_test(self) -> bool:
        """Whether Caffe instantiates this layer in the TEST phase (``NetState`` rules)."""
        if self._at_test is None:
            self._at_test = self._test_phase()
        return self._at_test

    def _test_phase(self) -> bool:
        phase = self.doc.string(self.body.first("phase"))
        if phase:
            return phase == "TEST"
        rules = self.body.all("include")
        if rules:
            return any(self._rule_phase(r) in (None, "TEST") for r in rules)
        return not any(self._rule_phase(r) == "TEST" for r in self.body.all("exclude"))

    def _rule_phase(self, rule: Field) -> str | None:
        return self.doc.string(rule.value.first("phase")) if rule.value else None

    @property
    def bottoms(self) -> list[str]:
        """The input blob names, unescaped (``bottom: "a"`` fields and ``bottom: ["a", "b"]``)."""
        if self._bottoms is None:
            self._bottoms = self._names("bottom")
        return self._bottoms

    @property
    def tops(self) -> list[str]:
        """The output blob names, unescaped."""
        if self._tops is None:
            self._tops = self._names("top")
        return self._tops

    def _names(self, key: str) -> list[str]:
        out = []
        for f in self.body.all(key):
            if f.value is not None:
                raise self.doc.error(f.start, f"layer {self.name!r}: {key} is a block, not a string")
            for group in f.groups():
                if any(t.kind != "string" for t in group):
                    what = f"layer {self.name!r}: {key} {group[0].text!r} is not a string"
                    raise self.doc.error(group[0].start, what)
                raw = bytearray()
                for t in group:
                    raw += _unescape_literal(t.text[1:-1])
                out.append(raw.decode("utf-8", "surrogateescape"))
        return out

    # -- parameter blocks -----------------------------------------------------------------
    def param(self, block: str) -> Field | None:
        """The layer's ``block { ... }`` (e.g. ``batch_norm_param``), None if absent; given
        twice or not as a block is an error, as it is for Caffe."""
        params = self.body.all(block)
        if len(params) > 1:
            raise self.doc.error(params[1].start, f"layer {self.name!r}: {block} given twice")
        if params and params[0].value is None:
            raise self.doc.error(params[0].start, f"layer {self.name!r}: {block} is not a block")
        return params[0] if params else None

    def param_field(self, block: str, name: str) -> Field | None:
        """The scalar field ``name`` inside ``block``, None if either is absent."""
        param = self.param(block)
        if param is None or param.value is None:
            return None
        found = param.value.all(name)
        if len(found) > 1:
            raise self.doc.error(found[1].start, f"layer {self.name!r}: {name} given twice")
        if found and found[0].value is not None:
            raise self.doc.error(found[0].start, f"layer {self.name!r}: {name} must be a value")
        return found[0] if found else None

    @property
    def bn_param(self) -> Field | None:
        return self.param("batch_norm_param")

    def bn_field(self, name: str) -> Field | None:
        return self.param_field("batch_norm_param", name)

    # -- scalar readers -------------------------------------------------------------------
    def _value_text(self, f: Field) -> str:
        """The one token of a scalar value; anything else (a list, a block, concatenated
        strings) as written, which no reader accepts."""
        if f.value is not None:
            return "{...}"
        groups = f.groups()
        if len(groups) != 1 or len(groups[0]) != 1 or self.doc.text[f.vstart] == "[":
            return self.doc.text[f.vstart : f.end]
        return groups[0][0].text

    def number(self, f: Field) -> float:
        """A float or double field's value as protobuf's ``ConsumeDouble`` reads it: an
        optional ``-``, then a decimal integer, a float (``1e-5``, ``.5``, ``1.0f``) or
        ``inf``/``infinity``/``nan``.  Hex and octal integers are refused, as protobuf does."""
        text = self._value_text(f)
        value = _float_value(text)
        if value is None:
            raise self.doc.error(f.vstart, f"layer {self.name!r}: {f.name} {text!r} is not a number")
        return value

    def integer(self, f: Field) -> int:
        """An int32 field's value as ``ConsumeSignedInteger`` reads it (decimal, hex, octal)."""
        text = self._value_text(f)
        value = _int_value(text, -(1 << 31), (1 << 31) - 1)
        if value is None:
            raise self.doc.error(f.vstart, f"layer {self.name!r}: {f.name} {text!r} is not an integer")
        return value

    def boolean(self, f: Field) -> bool:
        """A bool field's value: ``true``/``True``/``t``, ``false``/``False``/``f``, or the
        integer 0 or 1 (any base), exactly what protobuf accepts."""
        text = self._value_text(f)
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        value = _int_value(text, 0, 1) if not text.startswith("-") else None
        if value is None:
            raise self.doc.error(f.vstart, f"layer {self.name!r}: {f.name} {text!r} is not a boolean")
        return bool(value)

    @property
    def eps(self) -> float | None:
        """The eps written in the file, or None when Caffe's default (1e-5) applies."""
        f = self.bn_field("eps")
        if f is None:
            return None
        value = self.number(f)
        if not (0 <= value < float("inf")):  # Caffe would divide by sqrt(var + eps): NaN or 0
            text = self._value_text(f)
            raise self.doc.error(f.vstart, f"layer {self.name!r}: eps {text!r} is not a finite number >= 0")
        return value

    @property
    def use_global_stats(self) -> bool | None:
        f = self.bn_field("use_global_stats")
        return None if f is None else self.boolean(f)

    def validate(self) -> None:
        """Raise the error of a malformed eps or use_global_stats now rather than later."""
        _ = self.eps, self.use_global_stats

    # -- edits ----------------------------------------------------------------------------
    def set_value(self, f: Field, text: str) -> Splice:
        """Replace a scalar's value, keeping everything around it (including a trailing comment)."""
        return Splice(f.vstart, f.end, text)

    def add_field(self, parent: Message, text: str) -> Splice:
        """Insert ``text`` (one or more lines, ``\\n``-separated) as the last field of ``parent``.

        The new field borrows its indentation from the last sibling and the document's line
        ending; a block that is written on one line gets the field on that same line.  When a
        comment ends where the new lines go in a CR-only file, they start with ``\\r\\n``: a lone
        ``\\r`` would leave them inside the comment for Caffe.
        """
        doc = self.doc
        last_end = parent.fields[-1].end if parent.fields else parent.open + 1
        if doc.same_line(last_end, parent.close):
            one_line = " ".join(part.strip() for part in text.split("\n"))
            return Splice(last_end, last_end, " " + one_line)  # exactly what revert removes
        indent = doc.indent_of(parent.fields[-1].start) if parent.fields else None
        if indent is None:  # no sibling on a line of its own: one step inside the closing brace
            indent = (doc.indent_of(parent.close) or "") + self.block_indent()
        pos = doc.line_end(last_end)
        lines = [indent + part for part in text.split("\n")]
        first = doc.newline
        if first == "\r" and any(c.end == pos for c in doc.comments_between(doc.line_start(pos), pos)):
            first = "\r\n"
        return Splice(pos, pos, first + doc.newline.join(lines))

    def block_indent(self) -> str:
        """One indentation step inside this layer, as its fields are indented."""
        first = self.body.fields[0] if self.body.fields else None
        outer = self.doc.indent_of(self.field.start) or ""
        inner = self.doc.indent_of(first.start) if first else None
        if inner is not None and len(inner) > len(outer) and inner.startswith(outer):
            return inner[len(outer) :]
        return "\t" if outer.startswith("\t") else "  "


def parse(text: str, path: str = "<prototxt>") -> Document:
    return Document(text, path)


def read(path: str | Path) -> Document:
    """Read and parse a regular file (a FIFO, device or directory is refused at once, see
    :mod:`bnfix.files`); bytes that are not text (a caffemodel, say) are refused up front."""
    p = Path(path)
    raw = read_regular(p)
    if b"\0" in raw[:4096]:
        raise ParseError(f"{p}: not a text prototxt (binary data; is it a caffemodel?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"{p}: not UTF-8 text at byte {exc.start}") from None
    if text.startswith("\ufeff"):
        raise ParseError(f"{p}: starts with a byte-order mark, which Caffe's parser rejects")
    return Document(text, str(p))
