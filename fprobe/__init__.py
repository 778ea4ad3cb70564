"""fprobe: what one RL step does to a language model's entropy — ΔH_true by SNIS, δH₁ by jvp."""

from . import decompose, optim, tree
from .decompose import Contributions
from .losses import group_advantages
from .policy import Policy
from .probe import EntropyChange, ProbeResult, entropy_change, probe
from .rollouts import Rollouts
from .sampling import sample
from .step import Step, UpdateLostWarning, ZeroAdvantagesWarning, rl_step
from .sweep import SweepResult
from .tokens import TokenStats, token_stats
from .user_warnings import LowESSWarning



def __getattr__(name: str):
    """``fprobe.trl`` (probing TRL trainers) and ``fprobe.checkpoints`` load on first use: they import
    transformers' Trainer, which takes seconds."""
    if name in ("trl", "checkpoints"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EntropyChange", "LowESSWarning", "Policy", "ProbeResult", "Rollouts", "Step", "SweepResult", "TokenStats",
    "entropy_change", "group_advantages", "optim", "probe", "rl_step", "token_stats", "tree",
    "sample", "Contributions", "decompose", "UpdateLostWarning", "ZeroAdvantagesWarning",
]
