"""Result records as JSON: non-finite numbers become null."""

import dataclasses

import torch

from fprobe import records
from helpers import strict_json


def test_non_finite_tensor_fields_become_null_in_json():
    @dataclasses.dataclass(frozen=True)
    class Record:
        scalar: torch.Tensor
        vector: torch.Tensor

    record = Record(torch.tensor(float("nan")), torch.tensor([1.0, float("inf"), -float("inf")]))
    assert strict_json(records.to_json(record)) == {"scalar": None, "vector": [1.0, None, None]}
