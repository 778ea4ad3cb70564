"""A batch of sampled sequences: token ids, masks and (for the update batch) rewards and advantages."""

import dataclasses
from dataclasses import dataclass

import torch


def _rows(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(mask).flatten()]


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the rows whose token ids fall outside ``[0, vocab_size)``."""
    outside = _rows(((input_ids < 0) | (input_ids >= vocab_size)).any(-1))
    if outside:
        raise ValueError(f"rows {outside} hold token ids outside the model's vocabulary [0, {vocab_size})")


@dataclass(frozen=True, eq=False)
class Rollouts:
    """n sequences of prompt + response, padded to one width L.

    ``response_mask[i, k]`` marks the response tokens of row i: the positions whose log-prob
    log π(y_k | x, y_<k) counts; prompt and padding are excluded. ``advantages``, ``rewards`` and
    ``group_ids`` (one per row) are needed for the update batch only. ``max_response_length`` is
    the configured maximum response length (the ``dr_grpo`` normaliser); by default the longest
    response in the batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    max_response_length: int | None = None

    def __post_init__(self):
        ids, attn, resp = self.input_ids, self.attention_mask, self.response_mask
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.dtype not in (torch.long, torch.int):  # uint8/int16 ids: embeddings take long or int only
            object.__setattr__(self, "input_ids", ids := ids.to(torch.long))
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"empty batch: input_ids has shape {tuple(ids.shape)}")
        for name in ("attention_mask", "response_mask"):
            if getattr(self, name).shape != ids.shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, input_ids {tuple(ids.shape)}")
        not_binary = _rows(((attn != 0) & (attn != 1)).any(-1))
        if not_binary:
            raise ValueError(f"attention_mask must hold 0 (padding) and 1 (a token) only; rows {not_binary} hold other values")
        object.__setattr__(self, "attention_mask", attn.to(torch.long))
        object.__setattr__(self, "response_mask", resp.to(torch.bool))
        resp = self.response_mask
        empty = _rows(resp.sum(-1) == 0)
        if empty:
            raise ValueError(f"rows {empty} have no response tokens (zero-length responses)")
        outside = _rows((resp & (self.attention_mask == 0)).any(-1))
        if outside:
            raise ValueError(f"rows {outside} mark padding (attention_mask = 0) as response tokens")
        attended_before = self.attention_mask.cumsum(-1) - self.attention_mask
        unconditioned = _rows((resp & (attended_before == 0)).any(-1))
        if unconditioned:
            raise ValueError(
                f"rows {unconditioned} have a response token whose whole prefix is padding (attention_mask = 0 "
                "before it): it has no prefix to condition on"
            )
        for name in ("advantages", "rewards", "group_ids"):
            value = getattr(self, name)
            if value is None:
                continue
            if value.shape != (ids.shape[0],):
                raise ValueError(f"{name} must have one entry per row ({ids.shape[0]}), got shape {tuple(value.shape)}")
            if name != "group_ids" and (value.is_complex() or value.dtype == torch.bool):
                raise TypeError(f"{name} must be real numbers, got dtype {value.dtype}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} are not finite in rows {_rows(~torch.isfinite(value))}")
        if self.max_response_length is not None and self.max_response_length < int(self.lengths.max()):
            raise ValueError(
                f"max_response_length={self.max_response_length} is shorter than the longest response ({int(self.lengths.max())})"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """T_i: response tokens per row."""
        return self.response_mask.sum(-1)

    @property
    def n_tokens(self) -> int:
        return int(self.response_mask.sum())

    def select(self, rows: slice | torch.Tensor | list[int]) -> "Rollouts":
        """The sub-batch of the given rows (every per-row field sliced alike)."""
        fields = {
            f.name: (v[rows] if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in dataclasses.fields(self)
        }
        return Rollouts(**fields)

    def micro_batches(self, size: int | None) -> list["Rollouts"]:
        """Consecutive row chunks of at most ``size`` rows (one chunk if None)."""
        if size is None or size >= len(self):
            return [self]
        if size < 1:
            raise ValueError(f"micro_batch must be a positive number of rows, got {size}")
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]
