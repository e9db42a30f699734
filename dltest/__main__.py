"""``python -m dltest``: the same command line as ``dltest``."""

from dltest.cli import main

if __name__ == "__main__":
    main()
