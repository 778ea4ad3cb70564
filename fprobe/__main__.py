"""``python -m fprobe``: the command line."""

from fprobe.cli.command import main

raise SystemExit(main())
