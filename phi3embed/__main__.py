"""``python -m phi3embed``: the same as the ``phi3embed`` command."""

from phi3embed.cli.app import main

if __name__ == "__main__":
    main()
