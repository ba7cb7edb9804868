"""Shared test helpers for the trainer tests."""

from __future__ import annotations

from torch.utils.data import Dataset, TensorDataset


class Plain(Dataset):
    """A dataset that is not a TensorDataset (goes through the trainer's DataLoader path)."""

    def __init__(self, ds: TensorDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]
