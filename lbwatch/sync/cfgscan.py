"""haproxy's configuration read as haproxy reads it: lines and words. Pure.

What a received version may do is decided on its words (``admit``), so the words must be the
ones haproxy acts on, not what the text looks like: ``lua\\-load``, ``"lua-load"``,
``'lua'-load`` and ``lua\\x2dload`` are all the keyword ``lua-load`` to haproxy. The rules are
haproxy 2.6's ``parse_line()`` (src/tools.c), called by ``readcfgfile()`` (src/cfgparse.c) with
every option on (environment, double and single quotes, backslash, ``#``, word expansion):

- a line ends at ``\\n``; a ``\\r`` or a NUL ends what haproxy reads of it (after a NUL it
  stops with "Stray NUL character");
- leading spaces are skipped; a line starting with ``[`` is a scope marker, not a directive;
- words are split on unescaped, unquoted spaces (C ``isspace``: space, ``\\t\\n\\v\\f\\r``);
- ``#`` outside quotes starts a comment; ``"`` and ``'`` quote (no escapes inside ``'``);
- a backslash outside single quotes escapes ``\\``, a space, ``#``, ``'``, ``"``, ``$`` (in
  double quotes only), and makes ``\\t``, ``\\n``, ``\\r`` and ``\\xHH``; any other pair stays
  (``\\x00`` makes a NUL, which ends the word for haproxy, whose words are C strings: a word
  holding one is kept whole here, and ``admit`` refuses it);
- ``$NAME`` or ``${NAME}`` (``${NAME-default}``, ``${NAME[*]}``) inside double quotes is
  replaced by the environment of the haproxy process, which lbwatch cannot see: such a word is
  marked ``env`` and keeps the reference as written.

Where lbwatch cannot be sure it reads what haproxy reads, it errs towards seeing more: text after
a ``\\r`` or a NUL is scanned as a line of its own, and every branch of ``.if`` blocks is
scanned.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_SPACE = " \t\n\v\f\r"
_SPACES = re.compile("[ \t\n\v\f\r]+")
_SPECIAL = re.compile("[\"'\\\\#$]")  # a line without these splits on spaces alone
_PARTS = re.compile("[\r\0]")
_ESCAPED = {" ": " ", "\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_HEX = "0123456789abcdefABCDEF"


@dataclass(frozen=True)
class Word:
    text: str  # as haproxy reads it, but environment references kept as written
    env: bool = False  # holds an environment reference: its value is the haproxy process's


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, counted in newlines, as haproxy's messages count
    words: tuple[Word, ...]

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(w.text for w in self.words)


def scan(content: bytes) -> Iterator[Line]:
    """The directive lines of a configuration (comments and blank lines left out), one at a
    time: a large version is never held as words all at once."""
    text = content.decode("latin-1")  # one character per byte, as haproxy's char*
    start, number = 0, 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        number += 1
        raw = text[start:end]
        start = end + 1
        for part in _PARTS.split(raw) if ("\r" in raw or "\0" in raw) else (raw,):
            stripped = part.lstrip(_SPACE)
            if not stripped or stripped.startswith("["):
                continue
            words = split(stripped)
            if words:
                yield Line(number, words)


def split(line: str) -> tuple[Word, ...]:
    """One line's words, as ``parse_line()`` splits and unquotes them."""
    if not _SPECIAL.search(line):
        return tuple(Word(w) for w in _SPACES.split(line) if w)
    words: list[Word] = []
    out: list[str] = []
    env = False
    squote = dquote = False
    started = False  # the current word has begun (a quoted empty word counts)
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c == "#" and not squote and not dquote:
            break
        if c == '"' and not squote:
            dquote, started = not dquote, True
            i += 1
        elif c == "'" and not dquote:
            squote, started = not squote, True
            i += 1
        elif c == "\\" and not squote:
            sent, i = _escape(line, i, dquote)
            out.append(sent)
            started = True
        elif c in _SPACE and not squote and not dquote:
            while i < n and line[i] in _SPACE:
                i += 1
            words.append(Word("".join(out), env))
            out, env, started = [], False, False
        elif c == "$" and dquote:
            ref, i = _env_ref(line, i)
            out.append(ref)
            env = started = True
        else:
            out.append(c)
            started = True
            i += 1
    if out or started:
        words.append(Word("".join(out), env))
    return tuple(words)


def _escape(line: str, i: int, dquote: bool) -> tuple[str, int]:
    """The character a backslash at ``i`` sends, and where reading goes on."""
    nxt = line[i + 1] if i + 1 < len(line) else ""
    if nxt in _ESCAPED:
        return _ESCAPED[nxt], i + 2
    if nxt in ("#", "'", '"') or (nxt == "$" and dquote):
        return nxt, i + 2
    if nxt == "x" and len(line) > i + 3 and line[i + 2] in _HEX and line[i + 3] in _HEX:
        return chr(int(line[i + 2 : i + 4], 16)), i + 4
    # haproxy refuses a bad \x sequence (the check fails); any other pair is sent as it is.
    return "\\", i + 1


def _env_ref(line: str, i: int) -> tuple[str, int]:
    """An environment reference at ``i`` (``$NAME``, ``${...}``), as written, and its end."""
    j = i + 1
    if j < len(line) and line[j] == "{":
        end = line.find("}", j)
        end = len(line) if end < 0 else end + 1
        return line[i:end], end
    while j < len(line) and (line[j].isalnum() or line[j] in "_."):
        j += 1
    return line[i:j], j
