"""fprobe: what one RL step does to a language model's entropy — ΔH_true by SNIS, δH₁ by jvp."""

from . import optim, tree
from .losses import group_advantages
from .policy import Policy
from .rollouts import Rollouts
from .step import Step, rl_step
from .tokens import TokenStats, token_stats

__all__ = ["Policy", "Rollouts", "Step", "TokenStats", "group_advantages", "optim", "rl_step", "token_stats", "tree"]
