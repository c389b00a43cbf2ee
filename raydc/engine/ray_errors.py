"""Reading Ray's errors: what Ray Train wrapped, and whether Ray lost part of itself.

`trainer.fit()` raises a TrainingFailedError: a WorkerGroupError holding each failed rank's exception, or a
ControllerError holding the controller's. The driver looks inside for a cause it can name in one line (a
UserError, a full disk: `raydc.engine.trainer`); the CLI, for Ray having lost a process or a node
(`raydc.cli`), so that neither prints Ray's stack traces for what is not a bug. A distributed k-means asks
whether a shard's failed call is a loss it may resume from (`shard_lost`, `raydc.engine.sharded_kmeans`)."""
from __future__ import annotations

import sys


def train_failures(e: BaseException) -> list[BaseException]:
    """The exceptions inside a Ray Train TrainingFailedError (each failed rank's, or the controller's); none for
    any other error. Read by attribute, so nothing of `ray.train.v2._internal` is imported."""
    failures = list(getattr(e, "worker_failures", {}).values())
    controller = getattr(e, "controller_failure", None)
    if controller is not None:
        failures.append(controller)
    return failures


def ray_lost(e: BaseException) -> BaseException | None:
    """The Ray error inside `e` that says Ray lost part of itself (an actor's process or its node, an object's
    owner, a process its memory monitor killed), or None for anything else: above all an error raised by raydc's
    or the user's code inside a task or an actor's constructor, which is a bug or bad input and keeps its
    traceback. A task that failed because something it called was lost (a Train worker calling a shard actor
    whose raylet died) raises a RayTaskError whose cause is the loss: that counts. Ray Train reports a lost worker
    as a WorkerGroupError whose rank failed its health check with the actor unavailable, and a lost controller as
    a ControllerError: both are unwrapped, and count only if every failure inside was a loss."""
    if "ray" not in sys.modules:
        return None
    from ray import exceptions as rex

    if isinstance(e, rex.RayActorError) and getattr(e, "actor_init_failed", False):
        return None  # its constructor raised: code, not Ray
    if isinstance(e, rex.RayTaskError):
        cause = getattr(e, "cause", None)
        return ray_lost(cause) if isinstance(cause, BaseException) and cause is not e else None
    if isinstance(e, (rex.RayActorError, rex.NodeDiedError, rex.ObjectLostError, rex.OutOfMemoryError)):
        return e
    failures = train_failures(e)
    if failures:
        lost = [ray_lost(f) for f in failures]
        return lost[0] if all(lost) else None
    inner = getattr(e, "health_check_failure", None)  # a rank's failed health check, inside a WorkerGroupError
    return ray_lost(inner) if isinstance(inner, BaseException) else None


def killed_for_memory(e: BaseException) -> bool:
    """Whether Ray's memory monitor killed the process (a task's OutOfMemoryError, or an actor that died of it):
    resuming on the same node with the same batches would meet the same limit."""
    from ray import exceptions as rex

    return isinstance(e, rex.OutOfMemoryError) or (
        isinstance(e, rex.RayActorError) and "running low on memory" in str(e))


def shard_lost(e: BaseException) -> bool:
    """Whether a call to a shard actor failed because Ray lost something (`ray_lost`: the shard's process or node,
    an object only it held, another shard it fetched from), which a k-means resumed from its last centroids
    recovers from once the shards are back. Never an error the code raised, nor an actor whose constructor raised:
    restarted, it would raise again, and a retry would only delay the error."""
    return ray_lost(e) is not None
