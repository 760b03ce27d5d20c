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


def test_only_the_most_recently_seen_cameras_are_kept() -> None:
    """10,000 camera ids cannot grow a worker's per-camera state: beyond the bound, those seen least recently
    are named for forgetting (their state resumes from Redis if they send again)."""
    cameras = CameraPartitions(lambda _: None)
    for i in range(10_000):
        cameras.seen(f"cam-{i}", "frames", i % 8)
    cameras.seen("cam-0", "frames", 0)  # seen again: now the most recent
    forgotten = cameras.idle(keep=100)
    assert len(forgotten) == 9_900 and "cam-0" not in forgotten and "cam-9999" not in forgotten
    assert "cam-1" in forgotten and "cam-9900" in forgotten and "cam-9901" not in forgotten
    assert cameras.idle(keep=100) == set()
