"""Probe a TRL ``GRPOTrainer``'s own optimizer steps in place (see ``fprobe.trl.probe``)."""

from fprobe.trl.probe import TrlProbe, attach

__all__ = ["TrlProbe", "attach"]
