"""`distributed.session`: the process group it creates is destroyed on success and on error."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from semlens import distributed


def _one_process_group(tmp_path):
    def init(backend=None):
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group(backend or "gloo", store=store, rank=0, world_size=1)
        return True
    return init


def test_session_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session() as parallel:
        assert parallel is False and distributed.world_size() == 1
    assert not distributed.is_distributed()


def test_session_destroys_its_group_on_success_and_on_error(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "init_from_env", _one_process_group(tmp_path))
    with distributed.session() as parallel:
        assert parallel and distributed.is_distributed()
    assert not distributed.is_distributed()
    monkeypatch.setattr(distributed, "init_from_env", _one_process_group(tmp_path / "again"))
    (tmp_path / "again").mkdir()
    with pytest.raises(ValueError, match="boom"), distributed.session():
        assert distributed.is_distributed()
        raise ValueError("boom")
    assert not distributed.is_distributed()


def test_session_leaves_a_group_it_did_not_create(tmp_path):
    _one_process_group(tmp_path)()
    try:
        with distributed.session() as parallel:
            assert parallel
        assert distributed.is_distributed()
    finally:
        dist.destroy_process_group()
