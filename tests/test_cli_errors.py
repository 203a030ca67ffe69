"""The CLI's one error boundary (phi3embed/cli/errors.py): every command reports failures the same way."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from phi3embed.cli import errors
from phi3embed.cli.app import app as phi3embed_app
from phi3embed.errors import CheckpointError, ImageError

_BOUNDARY = errors.one_line_errors(lambda: None).__code__  # every wrapper one_line_errors makes runs this code


def _reports_one_way(callback: Callable[..., Any]) -> bool:
    fn: Any = callback
    while fn is not None:
        if getattr(fn, "__code__", None) is _BOUNDARY:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def test_every_command_reports_errors_through_the_one_boundary() -> None:
    group = typer.main.get_command(phi3embed_app)
    commands = group.commands  # type: ignore[attr-defined]
    assert {"encode", "plan", "preview", "info", "download", "combine", "merge-manifests"} <= set(commands)
    missing = [name for name, command in commands.items() if not _reports_one_way(command.callback)]
    assert missing == []


def _app(failure: BaseException | None, after: list[str]) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @errors.one_line_errors
    def run(
        out: Annotated[Path, typer.Option("--out")], count: Annotated[int, typer.Option("--count", min=1)] = 1
    ) -> None:
        """A command that fails the way it is told to; its options must still parse (the wrapper keeps them)."""
        after.append(f"{count} {out}")
        if failure is not None:
            raise failure
        raise typer.Exit(errors.FAILED)

    return app


@pytest.mark.parametrize(
    ("failure", "code", "line"),
    [
        (
            ImageError("cannot decode\n (truncated)", path="a b.jpg"),
            errors.USAGE,
            "error: a b.jpg: cannot decode (truncated)",
        ),
        (CheckpointError("no such checkpoint directory"), errors.USAGE, "error: no such checkpoint directory"),
        (
            errors.UsageError("--pack SIZE must look like 500MB"),
            errors.USAGE,
            "error: --pack SIZE must look like 500MB",
        ),
        (KeyboardInterrupt(), errors.INTERRUPTED, "error: interrupted"),
        (None, errors.FAILED, None),  # the command's own exit code passes through untouched
    ],
)
def test_failures_become_one_line_and_the_exit_code(failure: BaseException | None, code: int, line: str | None) -> None:
    seen: list[str] = []
    result = CliRunner().invoke(_app(failure, seen), ["--count", "3", "--out", "x"])
    assert seen == ["3 x"]  # an option that takes a value got its value (typer/click parse it as one)
    assert result.exit_code == code and result.stdout == ""
    assert result.stderr == ("" if line is None else line + "\n")


def test_a_bug_is_not_hidden_as_a_user_error() -> None:
    result = CliRunner().invoke(_app(ValueError("a bug"), []), ["--out", "x"])
    assert isinstance(result.exception, ValueError) and result.stderr == ""


def test_click_usage_errors_keep_exit_code_2() -> None:
    result = CliRunner().invoke(_app(None, []), ["--count", "0", "--out", "x"])
    assert result.exit_code == errors.USAGE and "--count" in result.stderr
    result = CliRunner().invoke(_app(None, []), [])  # --out is required
    assert result.exit_code == errors.USAGE and "--out" in result.stderr


def test_ctrl_c_in_a_real_command(app: typer.Typer, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    import phi3embed.jobs.plan

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(phi3embed.jobs.plan, "plan", interrupted)
    result = runner.invoke(app, ["plan", str(Path(__file__)), "--num-crops", "4"])
    assert result.exit_code == errors.INTERRUPTED and result.stderr == "error: interrupted\n"


def test_the_wrapper_keeps_the_signature_typer_reads() -> None:
    from phi3embed.cli.plan import plan_command

    assert "inputs" in inspect.signature(plan_command).parameters
