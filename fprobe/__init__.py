"""fprobe: what one RL step does to a language model's entropy — ΔH_true by SNIS, δH₁ by jvp.

The public API is what ``__all__`` lists; every other name lives in a subpackage (see the README's
"Layout"). ``fprobe.trl`` (TRL trainers) and ``fprobe.checkpoints`` load on first use: they import
transformers' Trainer, which takes seconds.
"""

from fprobe import tree
from fprobe.entropy import decompose
from fprobe.entropy.decompose import Contributions
from fprobe.entropy.measure import EntropyChange, entropy_change
from fprobe.entropy.probe import ProbeResult, probe
from fprobe.entropy.sweep import SweepResult
from fprobe.model.policy import Policy
from fprobe.model.tokens import TokenStats, token_stats
from fprobe.rl import optim
from fprobe.rl.step import Step, rl_step
from fprobe.rollouts import Rollouts
from fprobe.sampling.generate import sample
from fprobe.sampling.rewards import group_advantages
from fprobe.warnings import (
    DecompositionWarning, ImpreciseWarning, LowESSWarning, ShardingWarning, UndefinedScoreWarning, UpdateLostWarning,
    ZeroAdvantagesWarning,
)

LAZY = {"trl": "fprobe.trl", "checkpoints": "fprobe.rl.checkpoints"}


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        return importlib.import_module(LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Contributions", "DecompositionWarning", "EntropyChange", "ImpreciseWarning", "LowESSWarning", "Policy", "ProbeResult",
    "Rollouts", "ShardingWarning", "Step", "SweepResult", "TokenStats", "UndefinedScoreWarning", "UpdateLostWarning",
    "ZeroAdvantagesWarning", "decompose", "entropy_change",
    "group_advantages", "optim", "probe", "rl_step", "sample", "token_stats", "tree",
]
