"""StreamingCheckpointIO: a checkpoint is written to disk without a copy of it in memory, atomically."""

from __future__ import annotations

import tracemalloc

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from flexmoe.training.checkpoint_io import StreamingCheckpointIO, use_streaming_checkpoints

MB = 2**20


def peak_while(fn) -> int:
    """Peak Python-heap bytes allocated by ``fn`` (an ``io.BytesIO`` buffer is on it; tensors are not)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_saving_streams_to_disk_where_lightnings_buffers_the_whole_checkpoint(tmp_path):
    checkpoint = {"state_dict": {"w": torch.randn(8 * MB // 4)}, "epoch": 3}  # 8 MB of tensor
    ours = peak_while(lambda: StreamingCheckpointIO().save_checkpoint(checkpoint, tmp_path / "a" / "ours.ckpt"))
    theirs = peak_while(lambda: TorchCheckpointIO().save_checkpoint(checkpoint, tmp_path / "theirs.ckpt"))
    assert theirs > 8 * MB  # the measurement sees a buffered checkpoint...
    assert ours < 1 * MB  # ...and ours holds none of it
    loaded = StreamingCheckpointIO().load_checkpoint(tmp_path / "a" / "ours.ckpt")
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    path = tmp_path / "last.ckpt"
    io = StreamingCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises for a lambda)
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_remote_paths_go_to_lightnings_save():
    StreamingCheckpointIO().save_checkpoint({"step": 5}, "memory://flexmoe-test/ck.ckpt")
    assert TorchCheckpointIO().load_checkpoint("memory://flexmoe-test/ck.ckpt")["step"] == 5


def test_only_lightnings_default_is_replaced():
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert use_streaming_checkpoints(trainer) and type(trainer.strategy.checkpoint_io) is StreamingCheckpointIO

    class Chosen(TorchCheckpointIO):
        pass

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, plugins=[Chosen()])
    assert not use_streaming_checkpoints(trainer) and type(trainer.strategy.checkpoint_io) is Chosen
