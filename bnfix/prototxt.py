"""A lossless editor for Caffe prototxt (protobuf text format), cut down to what bnfix edits.

The input text is the only source of truth (tomlkit's rule): tokens are ``(kind, start, end)``
slices of it, messages and fields only remember spans, and the output is the original text with
splices applied.  A document with no edits renders to exactly its input, CRLF, comments, odd
quoting and unknown layer types included, because nothing is ever re-serialised.

What is parsed: the whole text-format grammar that Caffe files use (``name: value``,
``name { ... }``, ``name: { ... }``, ``< >`` messages, ``[a, b]`` lists, ``,``/``;``
separators, adjacent string concatenation, ``#`` comments).  What is interpreted: top-level
``layer`` blocks, their ``name``, ``type``, ``include``/``exclude`` phases and the fields of
``batch_norm_param``.  Everything else is carried as spans and never looked at.
"""

from __future__ import annotations

import bisect
import re
from collections import namedtuple
from pathlib import Path

from .errors import BnfixError

# One match per token, with the whitespace before it: half the matches of a separate
# whitespace token, which matters for 250 KB YOLOv4 prototxts.  ``bad`` catches anything else.
_TOKEN = re.compile(
    r"""[ \t\r\n\f\v]*(?:
    (?P<ident>[-+]?[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}\[\]<>:,;/])
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[fF]?))
  | (?P<comment>\#[^\r\n]*)
  | (?P<end>\Z)
  | (?P<bad>.)
    )""",
    re.VERBOSE | re.DOTALL,
)
_CLOSE = {"{": "}", "<": ">"}


class Token(namedtuple("Token", "kind start end text")):
    """A slice of the text: ``kind`` is comment, string, number, ident or punct."""

    __slots__ = ()


_EOF = Token("eof", -1, -1, "")


class Field:
    """``name: value`` or ``name { ... }``; spans are offsets into the document text."""

    __slots__ = ("end", "name", "start", "value", "value_tokens")

    def __init__(self, name: str, start: int, end: int):
        self.name, self.start, self.end = name, start, end  # end: one past the value
        self.value: Message | None = None  # set for message fields
        self.value_tokens: list[Token] = []  # set for scalars (and lists)


class Message:
    """A ``{ ... }`` block: offsets of its braces (-1 and len(text) for the document)."""

    __slots__ = ("close", "fields", "open")

    def __init__(self, open_: int, close: int):
        self.open, self.close = open_, close
        self.fields: list[Field] = []

    def all(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]

    def first(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


class Document:
    """A parsed prototxt: the text, its tokens and the message tree."""

    def __init__(self, text: str, path: str = "<prototxt>"):
        self.text = text
        self.path = path
        self.tokens = _tokenize(text, self)
        self._comments = [t for t in self.tokens if t.kind == "comment"]
        self._comment_starts = [t.start for t in self._comments]
        self.root = _Parser(self).parse()
        self.newline = "\r\n" if text.count("\r\n") * 2 > text.count("\n") else "\n"

    # -- positions ------------------------------------------------------------------------
    def where(self, offset: int) -> str:
        line = self.text.count("\n", 0, offset) + 1
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return f"{self.path}:{line}:{col}"

    def error(self, offset: int, message: str) -> BnfixError:
        return BnfixError(f"{self.where(offset)}: {message}")

    def line_start(self, offset: int) -> int:
        return self.text.rfind("\n", 0, offset) + 1

    def line_end(self, offset: int) -> int:
        """Offset of the line break ending this line (before ``\\r\\n``), or len(text)."""
        end = self.text.find("\n", offset)
        if end < 0:
            return len(self.text)
        return end - 1 if end > 0 and self.text[end - 1] == "\r" else end

    def same_line(self, a: int, b: int) -> bool:
        return "\n" not in self.text[min(a, b) : max(a, b)]

    def indent_of(self, offset: int) -> str | None:
        """The whitespace before ``offset`` on its line, or None if anything else precedes it."""
        before = self.text[self.line_start(offset) : offset]
        return before if before.strip() == "" else None

    def scalar(self, f: Field) -> str:
        """The value text of a scalar field (strings keep their quotes)."""
        return "".join(t.text for t in f.value_tokens)

    def string(self, f: Field | None) -> str | None:
        """A string or enum field's value without quotes (escapes are not needed for names)."""
        if f is None or f.value is not None:
            return None
        raw = self.scalar(f)
        parts = re.findall(r"\"((?:[^\"\\]|\\.)*)\"|'((?:[^'\\]|\\.)*)'", raw)
        return "".join(a or b for a, b in parts) if parts else raw

    def comments_between(self, start: int, end: int) -> list[Token]:
        lo = bisect.bisect_left(self._comment_starts, start)
        hi = bisect.bisect_left(self._comment_starts, end)
        return self._comments[lo:hi]

    # -- layers ---------------------------------------------------------------------------
    def layers(self) -> list[Layer]:
        return [Layer(self, f, i) for i, f in enumerate(self.root.all("layer")) if f.value]

    def render(self, splices: list[Splice], start: int = 0, end: int | None = None) -> str:
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


class Splice(namedtuple("Splice", "start end text order", defaults=(0,))):
    """Replace ``text[start:end]``; among insertions at one offset, lower ``order`` goes first."""

    __slots__ = ()


class Layer:
    """A ``layer { ... }`` block of the document, with the few facts bnfix needs."""

    def __init__(self, doc: Document, f: Field, index: int):
        assert f.value is not None
        self.doc, self.field, self.body, self.index = doc, f, f.value, index
        self.name = doc.string(self.body.first("name")) or ""
        self.type = doc.string(self.body.first("type")) or ""

    @property
    def runs_at_test(self) -> bool:
        """Whether Caffe instantiates this layer in the TEST phase (``NetState`` rules)."""
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
    def bn_param(self) -> Field | None:
        params = [f for f in self.body.all("batch_norm_param")]
        if len(params) > 1:
            raise self.doc.error(params[1].start, f"layer {self.name!r}: batch_norm_param given twice")
        if params and params[0].value is None:
            raise self.doc.error(params[0].start, f"layer {self.name!r}: batch_norm_param is not a block")
        return params[0] if params else None

    def bn_field(self, name: str) -> Field | None:
        param = self.bn_param
        if param is None:
            return None
        found = param.value.all(name)
        if len(found) > 1:
            raise self.doc.error(found[1].start, f"layer {self.name!r}: {name} given twice")
        if found and found[0].value is not None:
            raise self.doc.error(found[0].start, f"layer {self.name!r}: {name} must be a value")
        return found[0] if found else None

    @property
    def eps(self) -> float | None:
        """The eps written in the file, or None when Caffe's default (1e-5) applies."""
        f = self.bn_field("eps")
        if f is None:
            return None
        text = self.doc.scalar(f)
        try:
            value = float(text.rstrip("fF")) if not text.lower().startswith("0x") else float.fromhex(text)
        except ValueError:
            raise self.doc.error(f.value_tokens[0].start, f"layer {self.name!r}: eps {text!r} is not a number") from None
        if not (0 <= value < float("inf")):  # Caffe would divide by sqrt(var + eps): NaN or 0
            raise self.doc.error(f.value_tokens[0].start, f"layer {self.name!r}: eps {text!r} is not a finite number >= 0")
        return value

    @property
    def use_global_stats(self) -> bool | None:
        f = self.bn_field("use_global_stats")
        if f is None:
            return None
        text = self.doc.scalar(f)
        if text.lower() in ("true", "t", "1"):
            return True
        if text.lower() in ("false", "f", "0"):
            return False
        raise self.doc.error(f.start, f"layer {self.name!r}: use_global_stats {text!r} is not a boolean")

    def validate(self) -> None:
        """Raise the error of a malformed eps or use_global_stats now rather than later."""
        _ = self.eps, self.use_global_stats

    # -- edits ----------------------------------------------------------------------------
    def set_value(self, f: Field, text: str) -> Splice:
        """Replace a scalar's value, keeping everything around it (including a trailing comment)."""
        return Splice(f.value_tokens[0].start, f.value_tokens[-1].end, text)

    def add_field(self, parent: Message, text: str) -> Splice:
        """Insert ``text`` (one or more lines, ``\\n``-separated) as the last field of ``parent``.

        The new field borrows its indentation from the last sibling and the document's line
        ending; a block that is written on one line gets the field on that same line.
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
        return Splice(pos, pos, doc.newline + doc.newline.join(lines))

    def block_indent(self) -> str:
        """One indentation step inside this layer, as its fields are indented."""
        first = self.body.fields[0] if self.body.fields else None
        outer = self.doc.indent_of(self.field.start) or ""
        inner = self.doc.indent_of(first.start) if first else None
        if inner is not None and len(inner) > len(outer) and inner.startswith(outer):
            return inner[len(outer) :]
        return "\t" if outer.startswith("\t") else "  "


def _tokenize(text: str, doc: Document) -> list[Token]:
    tokens = []
    append = tokens.append
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "end":
            break
        start, end = m.span(kind)
        if kind == "bad":
            ch = text[start]
            raise doc.error(start, "unterminated string" if ch in "\"'" else f"unexpected character {ch!r}")
        append(Token(kind, start, end, text[start:end]))
    return tokens


class _Parser:
    """Recursive descent over the token list, skipping comments; builds the span tree."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.toks = [t for t in doc.tokens if t.kind != "comment"]
        self.toks.append(_EOF)
        self.i = 0

    def peek(self) -> Token:
        return self.toks[self.i]

    def take(self) -> Token:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def parse(self) -> Message:
        root = Message(-1, len(self.doc.text))
        self.fields(root, closer=None)
        return root

    def fields(self, msg: Message, closer: str | None) -> None:
        toks, append = self.toks, msg.fields.append
        while True:
            tok = toks[self.i]
            t = tok.text
            if tok is _EOF:
                if closer is not None:
                    raise self.doc.error(msg.open, f"'{self.doc.text[msg.open]}' is never closed")
                return
            if t == closer:
                msg.close = tok.start
                self.i += 1
                return
            if tok.kind == "punct" and t in "}>":
                raise self.doc.error(tok.start, f"unexpected '{t}' (no block to close)")
            append(self.field())
            if toks[self.i].text in (",", ";"):
                self.i += 1

    def field(self) -> Field:
        tok = self.take()
        if tok.kind == "punct" and tok.text == "[":  # [extension.name] or [type.url/Name]
            while self.peek().text != "]":
                if self.take() is _EOF:
                    raise self.doc.error(tok.start, "'[' is never closed")
            name = self.doc.text[tok.start : self.take().end]
        elif tok.kind == "ident":
            name = tok.text
        else:
            raise self.doc.error(tok.start, f"expected a field name, found {tok.text!r}")
        f = Field(name, tok.start, tok.end)
        nxt = self.peek()
        colon = nxt.text == ":"
        if colon:
            self.i += 1
            nxt = self.peek()
        if nxt is _EOF:
            raise self.doc.error(tok.start, f"field {name!r} has no value")
        t = nxt.text
        if t in _CLOSE:
            f.value = self.message()
            f.end = f.value.close + 1
        elif not colon:
            raise self.doc.error(nxt.start, f"expected ':' or '{{' after {name!r}, found {t!r}")
        elif t == "[":
            self.list_value(f)
        else:
            f.value_tokens = self.scalar()
            f.end = f.value_tokens[-1].end
        return f

    def message(self) -> Message:
        opener = self.take()
        msg = Message(opener.start, -1)
        self.fields(msg, closer=_CLOSE[opener.text])
        return msg

    def scalar(self) -> list[Token]:
        tok = self.take()
        if tok.kind not in ("string", "number", "ident"):
            raise self.doc.error(tok.start, f"expected a value, found {tok.text!r}")
        toks = [tok]
        while tok.kind == "string" and self.peek().kind == "string":
            toks.append(self.take())  # "a" "b" is one string in text format
        return toks

    def list_value(self, f: Field) -> None:
        opener = self.take()
        while True:
            nxt = self.peek()
            if nxt is _EOF:
                raise self.doc.error(opener.start, "'[' is never closed")
            t = nxt.text
            if t == "]":
                f.end = self.take().end
                return
            if t == ",":
                self.i += 1
            elif t in _CLOSE:
                self.message()
            else:
                f.value_tokens += self.scalar()


def parse(text: str, path: str = "<prototxt>") -> Document:
    return Document(text, path)


def read(path: str | Path) -> Document:
    """Read and parse; bytes that are not text (a caffemodel, say) are refused up front."""
    from .files import read_regular

    p = Path(path)
    raw = read_regular(p)
    if b"\0" in raw[:4096]:
        raise BnfixError(f"{p}: not a text prototxt (binary data; is it a caffemodel?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BnfixError(f"{p}: not UTF-8 text at byte {exc.start}") from None
    if text.startswith("\ufeff"):
        raise BnfixError(f"{p}: starts with a byte-order mark, which Caffe's parser rejects")
    return Document(text, str(p))


# TEMPORARY shim until the prototxt helper lands its API (dev worktree only)
def _shim() -> None:
    def _names(self, key):  # type: ignore[no-untyped-def]
        return [self.doc.string(f) or "" for f in self.body.all(key)]

    def param_field(self, block, name):  # type: ignore[no-untyped-def]
        fs = self.body.all(block)
        if not fs or fs[0].value is None:
            return None
        found = fs[0].value.all(name)
        return found[0] if found else None

    if not hasattr(Layer, "tops"):
        Layer.tops = property(lambda self: _names(self, "top"))  # type: ignore[attr-defined]
        Layer.bottoms = property(lambda self: _names(self, "bottom"))  # type: ignore[attr-defined]
        Layer.param_field = param_field  # type: ignore[attr-defined]


_shim()
