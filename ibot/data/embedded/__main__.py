"""``python -m ibot.data.embedded``: see :mod:`ibot.data.embedded.cli`."""

from ibot.data.embedded.cli import main

raise SystemExit(main())
