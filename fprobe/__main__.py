"""``python -m fprobe``: the command line."""

from .cli import main

raise SystemExit(main())
