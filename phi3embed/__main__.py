"""``python -m phi3embed``: the same as the ``phi3embed`` command."""

from .cli import main

if __name__ == "__main__":
    main()
