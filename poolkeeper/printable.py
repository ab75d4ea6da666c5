"""Text from jobs and users made safe to print on a terminal.

A job's error text, a job name in a daemon's reply, a command-line argument echoed back: any
of them may hold terminal control sequences (`\\x1b[2J` clears the screen, `\\x1b]0;...\\x07`
sets the window title, C1 codes do the same on some terminals) or bidi overrides that make
the text read differently from what it is. Every printer passes such text through
`printable()`, which shows those characters as Python escapes (`\\x1b`, `\\u202e`).
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, the line/paragraph separators, the bidi marks, embeddings,
# overrides and isolates, and lone surrogates (undecodable bytes of argv or file names).
_OTHERS = "\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_ANY = re.compile(f"[\x00-\x1f{_OTHERS}]")
_ANY_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f{_OTHERS}]")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if code <= 0xFF:
        return _SHORT.get(char, f"\\x{code:02x}")
    return f"\\u{code:04x}"


def printable(text: object, *, newlines: bool = False) -> str:
    """`text` (str() of it) with every control, bidi and separator character escaped.
    newlines=True keeps '\\n' (a multi-line traceback in a log); everything else goes."""
    return (_ANY_BUT_NEWLINE if newlines else _ANY).sub(_escape, str(text))
