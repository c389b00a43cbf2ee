"""Reading back what the trackers wrote, as a user's TensorBoard or MLflow would: event files parsed from their
TFRecord framing (tensorboardX's protobufs, no TensorFlow), and an MLflow store through MlflowClient."""
from __future__ import annotations

import struct
from pathlib import Path


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every event file under `logdir`."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        for event in _records(path, event_pb2.Event):
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def tensorboard_tags(logdir: Path, kind: str) -> set[str]:
    """Tags of the summaries of one kind ('image', 'tensor' for text) under `logdir`."""
    from tensorboardX.proto import event_pb2

    return {v.tag for path in Path(logdir).rglob("events.out.tfevents.*") for e in _records(path, event_pb2.Event)
            for v in e.summary.value if v.HasField(kind)}


def _records(path: Path, message):
    data = path.read_bytes()
    i = 0
    while i + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        yield message.FromString(data[i + 12:i + 12 + length])
        i += 12 + length + 4


def mlflow_runs(uri: str, experiment: str) -> dict[str, object]:
    """{run name: Run} of an experiment."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as raydc.tracking does where it writes
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def mlflow_history(uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)}


def mlflow_artifacts(uri: str, run_id: str, path: str = "report") -> list[str]:
    from mlflow import MlflowClient

    return sorted(a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id, path))
