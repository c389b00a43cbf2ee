"""Which failed calls to a shard actor a distributed k-means resumes from (`raydc.engine.ray_errors.shard_lost`):
the error shapes Ray raises, built from Ray's own classes."""
from __future__ import annotations


def test_a_shard_is_resumed_after_ray_lost_it_and_never_after_its_own_code_raised():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, ObjectLostError, RayTaskError

    from raydc.engine.ray_errors import shard_lost

    unavailable = ActorUnavailableError("The actor is temporarily unavailable: RpcError: Connection reset", None)
    object_lost = ObjectLostError("00ff" * 7, None, "fetch_chunk")
    bug = RayTaskError("partial", "Traceback (most recent call last): ...", ValueError("bad centroids"))
    fetched_lost = RayTaskError("fetch_chunk", "Traceback (most recent call last): ...", object_lost)
    assert shard_lost(ActorDiedError())  # its process or node went away
    assert shard_lost(unavailable)
    assert shard_lost(fetched_lost.as_instanceof_cause())  # a shard's task lost another shard's chunk
    assert shard_lost(NodeDiedError("node 06e1 died"))
    assert not shard_lost(bug.as_instanceof_cause())
    assert not shard_lost(ValueError("bad centroids"))
    # restarted after a loss, the shard's constructor raised (its recovery files unreadable, say): a retry
    # would restart it into the same error, `cluster.shard_restarts` times over
    init_failed = ActorDiedError(RayTaskError("ShardStore.__init__", "Traceback ...", OSError("unreadable")))
    assert init_failed.actor_init_failed and not shard_lost(init_failed)


def test_a_process_killed_by_rays_memory_monitor_is_named_as_such():
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError, OutOfMemoryError

    from raydc.engine.ray_errors import killed_for_memory, ray_lost

    context = ActorDiedErrorContext(class_name="ShardStore", actor_id=b"\x01" * 16, error_message=(
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
        "Task was killed due to the node running low on memory."))
    for error in (OutOfMemoryError("Task was killed due to the node running low on memory."), ActorDiedError(context)):
        assert ray_lost(error) is error and killed_for_memory(error)
    assert not killed_for_memory(ActorDiedError())  # a process lost for another reason
