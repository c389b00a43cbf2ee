"""How a method's `ExtractorSpec` reaches the feature pool's workers through the clustering coordinator.

Rank 0 puts the network (its builder and weights) into the object store once, and the spec it sends carries
only that reference. The coordinator passes the spec on without opening it, so it never unpickles a torch
module or tensor and does not load torch at all (seconds of CPU and a few hundred MB per run), and the weights
go from rank 0 to the workers without a copy through the coordinator. The workers open the spec.
"""
from __future__ import annotations

import dataclasses

import ray

from raydc.core.extractor import ExtractorSpec

__all__ = ["open_spec", "seal_spec"]


def _sealed() -> None:
    raise RuntimeError("this ExtractorSpec's network is sealed: open it with raydc.engine.sealed_spec.open_spec")


def seal_spec(spec: ExtractorSpec) -> ExtractorSpec:
    """The spec with its builder and weights behind one object ref (the `network` field)."""
    if spec.network is not None:
        return spec
    return dataclasses.replace(spec, build=_sealed, state={}, network=ray.put((spec.build, spec.state)))


def open_spec(spec: ExtractorSpec) -> ExtractorSpec:
    """The spec with its builder and weights back in place (a spec that was never sealed comes back as is)."""
    if spec.network is None:
        return spec
    build, state = ray.get(spec.network)
    return dataclasses.replace(spec, build=build, state=state, network=None)
