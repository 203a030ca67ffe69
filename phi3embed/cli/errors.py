"""How every command turns a failure into one line on stderr and an exit code: the CLI's one error boundary.

The library raises typed errors (:mod:`phi3embed.errors`); a command only adds :class:`UsageError` for a
problem with its own options. :func:`one_line_errors` wraps each command function, so no command catches
:class:`~phi3embed.errors.Phi3EmbedError` itself:

* a ``Phi3EmbedError`` (``UsageError`` included) escaping a command -> ``error: <message>``, exit :data:`USAGE` (2);
* Ctrl-C before a job took over its own signal handling -> ``error: interrupted``, exit :data:`INTERRUPTED` (130).

Click's own usage errors (an unknown option, a missing argument) keep Click's message and its exit code, also 2.
A command that ran returns its own code (``typer.Exit``): :data:`FAILED` when some images failed, and the job's
codes for a fatal stop or a signal.
"""

# No ``from __future__ import annotations``: Typer reads the wrapped command's annotations at runtime.

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from phi3embed.errors import Phi3EmbedError

OK = 0
FAILED = 1  # some images (or parts of a combined job) failed; the others are done
USAGE = 2  # usage, input, model, checkpoint or output problems, found before or stopping the work
INTERRUPTED = 130  # SIGINT (Ctrl-C)
TERMINATED = 143  # SIGTERM

P = ParamSpec("P")
R = TypeVar("R")


class UsageError(Phi3EmbedError):
    """A command's options do not fit together or cannot be parsed (``--pack 1 parsec``)."""


def one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """``command`` with its errors reported the CLI's one way (module docstring). Typer sees the same signature."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except Phi3EmbedError as exc:
            raise _exit(f"error: {exc}", USAGE) from None
        except KeyboardInterrupt:
            raise _exit("error: interrupted", INTERRUPTED) from None

    return run


def _exit(line: str, code: int) -> typer.Exit:
    typer.echo(line, err=True)
    return typer.Exit(code)
