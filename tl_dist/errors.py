"""The one exception type that means "the user gave us something wrong", and text made safe to print."""

import os
import sys
import unicodedata

# Bidirectional overrides and isolates: they reorder what a terminal shows (spoofed names).
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class UserError(Exception):
    """Bad usage, config, data or file. The CLI prints the message on one line and exits 2.

    The message must name the thing that is wrong (key, file, path) and say what to do.
    """

    exit_code = 2


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``), not obeyed by the terminal.

    Class names, paths and file contents reach the terminal; a name holding an escape sequence
    could otherwise retitle the window, recolour or clear the screen, or hide what follows.
    """
    return "".join(_escape(c) if unicodedata.category(c) == "Cc" or c in _BIDI else c for c in str(text))


def _escape(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def drop_stdout() -> None:
    """Send the rest of stdout to /dev/null: its reader left (a closed pipe) or it cannot be written
    (a full disk). Without this, Python's own flush at exit fails once more, with a traceback."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (some have none), for a one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def one_line(msg: object) -> str:
    """An error or warning for the terminal: one line, control characters escaped."""
    return printable(" ".join(str(msg).split()))


def first_few(items: list[str], n: int) -> str:
    """The first ``n`` items of a listing for a one-line message, and how many more there are."""
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more
