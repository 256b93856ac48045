"""Joining a conversion done in shards, on several machines, into the one file a single run writes.

``convert --shard k/n`` converts every n-th work item from the k-th into a file of its own whose
metadata carries the fingerprint of the whole output (its header's tensors and metadata). Work
items are independent and their results do not depend on which process made them, so ``join``
only has to plan the conversion again from the input's header, check every shard against that
plan, and stream the tensors into place: the result is byte-identical to a single run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .convert import (
    SHARD_METADATA,
    ConvertOptions,
    default_output_path,
    output_metadata,
    plan_conversion,
    run_inputs,
)
from .io import SafetensorsReader, write_stream


def join_shards(
    input_path: str | os.PathLike,
    shard_paths: Sequence[str | os.PathLike],
    output_path: str | os.PathLike | None = None,
    options: ConvertOptions | None = None,
) -> Path:
    """Write the output of converting ``input_path`` with ``options`` from the shards that hold it.

    The options must be those the shards were made with (checked through the fingerprint); the
    input is read for its header only (and for ``full_precision_above`` and ``max_size``, which plan from data).
    """
    options = options or ConvertOptions()
    output = Path(output_path) if output_path else default_output_path(input_path, options)
    with (
        SafetensorsReader(input_path) as source,
        plan_conversion(source, options) as plan,
        contextlib.ExitStack() as stack,
    ):
        metadata = output_metadata(source, plan)
        digest = plan.digest(metadata)
        owners: dict[str, SafetensorsReader] = {}
        for path in shard_paths:
            shard = stack.enter_context(SafetensorsReader(path))
            _check_shard(shard, digest)
            for name in shard.tensors:
                if name in owners:
                    raise ValueError(f"{name!r} is in both {owners[name].path} and {shard.path}")
                owners[name] = shard
        missing = [e.name for e in plan.entries if e.name not in owners and e.name not in plan.markers]
        if missing:
            raise ValueError(f"{len(missing)} output tensors are in none of the shards given, e.g. {missing[:3]}")

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for entry in plan.entries:
                marker = plan.markers.get(entry.name)
                yield entry.name, marker if marker is not None else owners[entry.name].read(entry.name)

        protect = run_inputs(options, input_path, *shard_paths)
        write_stream(output, plan.entries, tensors(), metadata, overwrite=options.overwrite, protect=protect)
    return output


def _check_shard(shard: SafetensorsReader, digest: str) -> None:
    """A shard of this very conversion: made from the same input header with the same options."""
    try:
        label = json.loads(shard.metadata[SHARD_METADATA])
        made_for = label["output"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{shard.path} is not a shard written by convert --shard") from None
    if made_for != digest:
        raise ValueError(
            f"{shard.path} (shard {label.get('shard')}) was made from another input or with other options; "
            "join with the options the shards were converted with"
        )
