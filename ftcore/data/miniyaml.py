"""A small YAML reader for template files: the subset that promptsource's templates.yaml files (and
files written like them) use, so that ftcore needs no YAML package.

Read: block mappings and sequences (a sequence may sit at its key's indentation, `- key: value`
items), plain / single-quoted / double-quoted scalars over several lines (folded as YAML folds
them: a line break is a space, an empty line a newline; `\\` at a line's end in double quotes
joins the lines; every double-quoted escape), the flow forms `[]`, `{}` and `[a, 'b', 3]` on one
line, comments, anchors and aliases (`&id001`, `*id001`), a leading `---`, and promptsource's tags
`!Template` / `!TemplateMetadata` (their mappings come back as plain dicts). Plain scalars resolve
to None (`null`, `~`, nothing), True / False (`true`, `false`), int (`12`, `-3`) and float
(`0.5`); everything else is a string.

Refused with one line naming file:line: block scalars (`|`, `>`), other tags, several documents,
flow collections that do not close on their line, tabs in indentation, duplicate keys, and plain
values that YAML 1.1 and 1.2 read differently (`yes`, `off`, `012`, `1e5`, `2024-01-02`): quote those.
"""
from __future__ import annotations

import re
from typing import Any

TAGS = ("!Template", "!TemplateMetadata")


class YamlError(ValueError):
    """A file this reader cannot read: the message starts with file:line."""


class YamlMap(dict):
    """A mapping that also knows where it is: `line` (its first key's) and `lines` {key: line}."""
    line: int = 0
    lines: dict


_NULL = {"", "~", "null", "Null", "NULL"}
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)\.[0-9]+")
# what YAML 1.1 (PyYAML) reads as a bool, number, date or merge key and the forms above do not cover
_AMBIGUOUS = re.compile(r"""(?x)
    (?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)
  | [-+]?0b[01_]+ | [-+]?0[0-7_]+ | [-+]?0x[0-9a-fA-F_]+ | [-+]?[0-9][0-9_]*
  | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?
  | [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)? | \.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
  | [-+]?[0-9._]*[0-9][0-9._]*[eE][-+]?[0-9]+ | [-+]?\.(?:inf|Inf|INF) | \.(?:nan|NaN|NAN)
  | [0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt \t].*)? | = | <<""")
_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f",
            "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0",
            "L": "\u2028", "P": "\u2029"}
_HEX = {"x": 2, "u": 4, "U": 8}


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """The document in `text`; `source` names it in errors (a file name)."""
    return _Parser(text, source).document()


class _Parser:
    def __init__(self, text: str, source: str, first_row: int = 0):
        self.lines = re.split(r"\r\n|\r|\n", text.lstrip("\ufeff"))
        self.source, self.first_row, self.row, self.anchors = source, first_row, 0, {}

    def fail(self, row: int, what: str):
        raise YamlError(f"{self.source}:{self.first_row + row + 1}: {what}")

    # -- lines --------------------------------------------------------------------------------

    def indent(self, row: int) -> int:
        line = self.lines[row]
        n = len(line) - len(line.lstrip(" "))
        if line[n:n + 1] == "\t":
            self.fail(row, "a tab in the indentation (YAML indents with spaces)")
        return n

    def next_content(self) -> int | None:
        """Moves past blank and comment lines; the row of the next content line, or None at the end."""
        while self.row < len(self.lines):
            stripped = self.lines[self.row].strip()
            if stripped and not stripped.startswith("#"):
                return self.row
            self.row += 1
        return None

    def is_entry(self, row: int, col: int) -> bool:
        return self.lines[row][col:col + 1] == "-" and self.lines[row][col + 1:col + 2] in ("", " ")

    def rest(self, row: int, col: int) -> str:
        """The line from col on, without a trailing comment."""
        text = self.lines[row][col:]
        m = re.search(r"(^|\s)#", text)
        return (text[:m.start()] if m else text).rstrip()

    # -- structure ----------------------------------------------------------------------------

    def document(self) -> Any:
        row = self.next_content()
        if row is None:
            return None
        if self.lines[row].rstrip() == "---":
            self.row += 1
            row = self.next_content()
            if row is None:
                return None
        if self.lines[row].startswith("%"):
            self.fail(row, "YAML directives are not read here")
        node = self.block(self.indent(row))
        row = self.next_content()
        if row is not None:
            self.fail(row, "unexpected text here (check its indentation; a file holds one document)")
        return node

    def block(self, ind: int) -> Any:
        """The node whose first line is the next content line, indented by `ind`."""
        row = self.next_content()
        if self.is_entry(row, ind):
            return self.sequence(ind)
        if self.key(row, ind) is not None:
            return self.mapping(ind)
        return self.value(row, ind, ind - 1, in_map=False)

    def mapping(self, ind: int) -> YamlMap:
        out = YamlMap()
        out.line, out.lines = self.row + 1, {}
        while (row := self.next_content()) is not None and self.indent(row) >= ind:
            if self.indent(row) > ind:
                self.fail(row, "unexpected indentation")
            found = self.key(row, ind)
            if found is None and self.lines[row].startswith(("---", "...")):
                self.fail(row, "several documents in one file: only one is read")
            if found is None:
                self.fail(row, "expected 'key: value'" + (" (a '- ' item where a key belongs)" if self.is_entry(row, ind) else ""))
            key, col = found
            if key in out:
                self.fail(row, f"duplicate key {key!r} (first at line {out.lines[key]})")
            out.lines[key] = row + 1
            out[key] = self.value(row, col, ind, in_map=True)
        return out

    def sequence(self, ind: int) -> list:
        out = []
        while (row := self.next_content()) is not None and self.indent(row) == ind and self.is_entry(row, ind):
            col = ind + 1
            while self.lines[row][col:col + 1] == " ":
                col += 1
            if self.rest(row, col) and (self.is_entry(row, col) or self.key(row, col) is not None):
                self.lines[row] = " " * col + self.lines[row][col:]  # `- key: v` / `- - v`: a block at col
                out.append(self.block(col))
            else:
                out.append(self.value(row, col, ind, in_map=False))
        if row is not None and self.indent(row) > ind:
            self.fail(row, "unexpected indentation")
        return out

    def key(self, row: int, col: int) -> tuple[Any, int] | None:
        """(key, column after its ':') when the line holds a mapping key at col, else None."""
        text = self.rest(row, col)
        if text[:1] in ("'", '"'):
            key, end, end_row = self.quoted(row, col)
            m = re.match(r"\s*:(\s|$)", self.lines[row][end:]) if end_row == row else None
            return (key, end + m.end(0) - len(m.group(1))) if m else None
        if not text or text[0] in "[{&*!|>%@`" or text[0] in "-?" and text[1:2] in ("", " "):
            return None
        m = re.search(r":(\s|$)", text)
        return (_resolve(text[:m.start()].rstrip(), row, self), col + m.start() + 1) if m else None

    def value(self, row: int, col: int, parent: int, in_map: bool) -> Any:
        """The node that starts at (row, col), after 'key:' or '- ', owned by a block at indent `parent`."""
        anchor = None
        text = self.rest(row, col).lstrip()
        col = len(self.lines[row]) - len(self.lines[row][col:].lstrip())
        while text[:1] in ("&", "!"):
            prop = text.split(None, 1)[0]
            if prop[0] == "&":
                anchor = prop[1:]
            elif prop not in TAGS:
                self.fail(row, f"the tag {prop} is not read here (only {', '.join(TAGS)})")
            text = text[len(prop):].lstrip()
            col = len(self.lines[row]) - len(self.lines[row][col + len(prop):].lstrip())
        if not text:  # the node is on the following lines (or there is none: null)
            self.row = row + 1
            nxt = self.next_content()
            if nxt is not None and self.indent(nxt) > parent:
                node = self.block(self.indent(nxt))
            elif nxt is not None and in_map and self.indent(nxt) == parent and self.is_entry(nxt, parent):
                node = self.sequence(parent)
            else:
                node = None
        elif text[0] == "*":
            if text[1:] not in self.anchors:
                self.fail(row, f"alias {text} names no earlier anchor")
            node, self.row = self.anchors[text[1:]], row + 1
        elif text[0] in ("'", '"'):
            node, end, end_row = self.quoted(row, col)
            if self.rest(end_row, end).strip():
                self.fail(end_row, f"text after the closing quote: {self.rest(end_row, end).strip()!r}")
            self.row = end_row + 1
        elif text[0] in "[{":
            node, self.row = self.flow(row, col), row + 1
        elif text[0] in "|>":
            self.fail(row, f"block scalars ('{text[0]}') are not read here: write the text in double quotes with \\n")
        elif text[0] in "%@`,]}" or text[0] in "-?:" and text[1:2] in ("", " "):
            self.fail(row, f"a plain value cannot start with {text[0]!r}: quote it")
        else:
            node = self.plain(row, col, parent)
        if anchor is not None:
            self.anchors[anchor] = node
        return node

    # -- scalars ------------------------------------------------------------------------------

    def plain(self, row: int, col: int, parent: int) -> Any:
        """A plain scalar from (row, col): continued by lines indented past `parent`, folded; a
        comment ends it."""
        parts, breaks, r = [self.rest(row, col).strip()], 0, row + 1
        ended = self.rest(row, col) != self.lines[row][col:].rstrip()
        while not ended and r < len(self.lines):
            line = self.lines[r]
            if not line.strip():
                breaks, r = breaks + 1, r + 1
                continue
            if self.indent(r) <= parent or line.lstrip().startswith("#"):
                break
            parts += ["\n" * breaks or " ", self.rest(r, 0).strip()]
            ended, breaks, r = self.rest(r, 0) != line.rstrip(), 0, r + 1
        self.row = r - breaks  # blank lines after the scalar are not part of it
        text = "".join(parts)
        if re.search(r":(\s|$)", text):
            self.fail(row, "':' followed by a space inside a plain value: quote the value")
        return _resolve(text, row, self)

    def quoted(self, row: int, col: int) -> tuple[str, int, int]:
        """(value, column after the closing quote, its row) of the quoted scalar at (row, col)."""
        quote, out, keep = self.lines[row][col], [], 0  # keep: out[:keep] is escaped, never trimmed
        r, c = row, col + 1
        while True:
            line = self.lines[r]
            while c < len(line):
                ch = line[c]
                if ch == quote:
                    if quote == "'" and line[c + 1:c + 2] == "'":
                        out.append("'")
                        c += 2
                        continue
                    return "".join(out), c + 1, r
                if quote == '"' and ch == "\\":
                    if c + 1 == len(line):  # an escaped line break: the lines join with nothing between
                        break
                    esc = line[c + 1]
                    if esc in _HEX:
                        digits = line[c + 2:c + 2 + _HEX[esc]]
                        if not re.fullmatch(r"[0-9a-fA-F]{%d}" % _HEX[esc], digits):
                            self.fail(r, f"bad escape \\{esc}{digits}")
                        out.append(chr(int(digits, 16)))
                        c += 2 + _HEX[esc]
                    elif esc in _ESCAPES:
                        out.append(_ESCAPES[esc])
                        c += 2
                    else:
                        self.fail(r, f"unknown escape \\{esc} in a double-quoted value")
                    keep = len(out)
                    continue
                out.append(ch)
                c += 1
            joined = quote == '"' and line.endswith("\\") and c == len(line) - 1
            if not joined:
                while len(out) > keep and out[-1] in " \t":
                    out.pop()
            r += 1
            blank = 0
            while r < len(self.lines) and not self.lines[r].strip():
                blank, r = blank + 1, r + 1
            if r == len(self.lines):
                self.fail(row, f"the {quote} quote opened here is never closed")
            out.append("\n" * blank if blank or joined else " ")
            keep = len(out) if joined else keep
            c = len(self.lines[r]) - len(self.lines[r].lstrip(" \t"))

    def flow(self, row: int, col: int) -> list | dict:
        """`[]`, `{}` or a one-line list of scalars."""
        text = self.rest(row, col)
        if text == "{}":
            return {}
        if not (text.startswith("[") and text.endswith("]")) or "[" in text[1:] or "{" in text:
            self.fail(row, "only [], {} and a one-line [a, b] list are read here: write a block list ('- a' lines)")
        items, inner, pos = [], text[1:-1], 0
        while inner[pos:].strip():
            pos += len(inner[pos:]) - len(inner[pos:].lstrip())
            if inner[pos] in "'\"":
                item, end, _ = _Parser(inner[pos:], self.source, row).quoted(0, 0)  # one line: closed on it
                pos += end
            else:
                end = inner.find(",", pos) if "," in inner[pos:] else len(inner)
                item, pos = _resolve(inner[pos:end].strip(), row, self), end
            items.append(item)
            rest = inner[pos:].lstrip()
            if rest and not rest.startswith(","):
                self.fail(row, f"expected ',' before {rest!r} in the [..] list")
            pos = len(inner) - len(rest) + 1
        return items


def _resolve(text: str, row: int, parser: _Parser) -> Any:
    if text in _NULL:
        return None
    if text in _BOOL:
        return _BOOL[text]
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if _AMBIGUOUS.fullmatch(text):
        parser.fail(row, f"{text!r} reads as a bool, number or date in YAML 1.1 but not in 1.2: quote it"
                         " (or write true / false, a plain integer, or a number like 0.5)")
    return text
