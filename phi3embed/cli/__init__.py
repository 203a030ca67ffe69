"""The ``phi3embed`` command: Typer commands and progress rendering, thin over the library.

``phi3embed.cli.app`` builds the application (``app``) and its console-script entry point (``main``).
"""
