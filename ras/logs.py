"""Log lines that untrusted values cannot break: the one formatter the ``ras`` command uses.

Theory of operation. A log line is ``time logger LEVEL message``, one line per event
(docs/operations.md), and its fields hold what peers sent: user names, resource ids, reasons,
exception texts. A CR LF in a user name would start a forged line; NUL, ESC (terminal escape
sequences) and C1 controls would reach the log reader raw. Rather than trusting every call
site to clean its arguments, :class:`LineFormatter` escapes them when it renders the message:

- every argument that is not a number (``%s`` and ``%r`` alike) has its control characters
  written as escapes: ``\\r`` ``\\n`` ``\\t``, ``\\x1b`` for other C0 controls and DEL, ``\\x85``
  for C1, ``\\u2028`` for the line and paragraph separators, ``\\ud800`` for a lone surrogate;
  a backslash in a ``%s`` argument is doubled, so an escape in the log always means the
  character and never text that looked like one;
- a message with no arguments (a preformatted one) is escaped whole, and a control character
  left in the rendered line by its format string is escaped too, so no line ever breaks;
- a traceback (``log.exception``: a bug) follows its line with every line indented, so
  nothing in it can pass for a line of its own.

Numbers (``%d``, ``%.1f``) are passed through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["JsonFormatter", "LineFormatter", "escape", "fields", "render"]

# C0, DEL, C1, the Unicode line and paragraph separators, (lone) surrogates.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line with nothing a terminal or a log reader would act on: control
    characters, separators and lone surrogates as escapes, and the backslash doubled."""
    return _UNSAFE.sub(_one, text)


def _controls(text: str) -> str:
    """Control characters as escapes, backslashes kept (for ``repr``, already unambiguous)."""
    return _CONTROL.sub(_one, text)


class _Safe:
    """An argument as it may appear in a line."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape(str(self.value))

    def __repr__(self) -> str:
        return _controls(repr(self.value))


def _safe(value: object) -> object:
    return value if isinstance(value, int | float) else _Safe(value)


def render(record: logging.LogRecord) -> str:
    """The record's message with its arguments escaped (see the module's docstring)."""
    args = record.args
    if not args:
        return escape(str(record.msg))
    safe: Any
    if isinstance(args, Mapping):
        safe = {key: _safe(value) for key, value in args.items()}
    else:
        safe = tuple(_safe(value) for value in args)
    try:
        text = str(record.msg) % safe
    except (TypeError, ValueError, KeyError):  # a format the escaped arguments do not fit
        text = escape(record.getMessage())
    return _controls(text)


class LineFormatter(logging.Formatter):
    """``2026-11-21T07:05:52.495Z ras.broker INFO message``: UTC, one line per event, every
    field escaped (:func:`render`)."""

    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03dZ %(name)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        saved = record.msg, record.args, record.exc_text
        record.msg, record.args, record.exc_text = render(record), None, None
        try:
            return super().format(record)
        finally:  # other handlers (a test's capture) see the record as it was
            record.msg, record.args, record.exc_text = saved

    def formatException(self, ei: Any) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("    " + _controls(line) for line in text.splitlines())


# ``key=value`` in a rendered message: the value runs to the next space.
_FIELD = re.compile(r"(?:^| )([a-z_]+)=(\S*)")


def fields(message: str) -> dict[str, str]:
    """The ``key=value`` fields of a rendered message (each value up to the next space; the
    message keeps the whole text)."""
    return {key: value for key, value in _FIELD.findall(message)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``--log-format json``): ``time``, ``level``, ``logger``,
    ``message`` (rendered and escaped as in text lines), its ``key=value`` ``fields``, and
    ``session`` at the top when the line concerns one, so that ``jq 'select(.session ==
    "s-...")'`` follows a session through the gateway, broker and agent logs. A traceback is
    ``exception``. ASCII only: nothing in a value can break the line."""

    def format(self, record: logging.LogRecord) -> str:
        message = render(record)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        obj: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        found = fields(message)
        if found:
            obj["fields"] = found
            if "session" in found:
                obj["session"] = found["session"]
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=True)
