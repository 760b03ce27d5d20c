"""The worker's rebalance listener: a camera's state is dropped only when no partition it was seen on is
still assigned (cameras may share partitions, and a camera may move between partitions)."""

from __future__ import annotations

from kafka import TopicPartition

from daemon.worker import CameraPartitions


def test_a_camera_is_dropped_once_none_of_its_partitions_is_left() -> None:
    dropped: list[set[str]] = []
    cameras = CameraPartitions(dropped.append)
    cameras.seen("cam-1", "frames", 0)
    cameras.seen("cam-1", "frames", 1)  # re-keyed: seen on two partitions
    cameras.seen("cam-2", "frames", 1)
    cameras.seen("cam-3", "frames", 2)
    cameras.on_partitions_revoked({TopicPartition("frames", 1)})
    assert dropped == [{"cam-2"}]
    cameras.on_partitions_lost({TopicPartition("frames", 0), TopicPartition("frames", 2)})
    assert dropped == [{"cam-2"}, {"cam-1", "cam-3"}]
    cameras.on_partitions_revoked({TopicPartition("frames", 0)})  # nothing left to drop: no call
    assert len(dropped) == 2
