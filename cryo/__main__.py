"""``python -m cryo``: the same as the ``cryo`` command."""

from cryo.cli import main

if __name__ == "__main__":
    main()
