"""The ``fprobe`` command line."""

from fprobe.cli.command import main

__all__ = ["main"]
