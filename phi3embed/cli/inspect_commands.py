"""The commands that look before you encode (``plan``, ``preview``, ``info``) and ``download``, one module each.

``register(app)`` adds them to the application that ``phi3embed.cli.app`` builds. Each reports its errors
through :func:`phi3embed.cli.errors.one_line_errors`.
"""

import typer

from phi3embed.cli.download import download_command
from phi3embed.cli.info import info_command
from phi3embed.cli.plan import plan_command
from phi3embed.cli.preview import preview_command


def register(app: typer.Typer) -> None:
    """Add ``plan``, ``preview``, ``info`` and ``download`` to ``app``."""
    app.command("plan")(plan_command)
    app.command("preview")(preview_command)
    app.command("info")(info_command)
    app.command("download")(download_command)
