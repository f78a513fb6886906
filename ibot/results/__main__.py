"""``python -m ibot.results <command>``: see :mod:`ibot.results.cli`."""

from ibot.results.cli import main

if __name__ == "__main__":
    main()
