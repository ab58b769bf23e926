"""Which process of a distributed launch this is, and how the others wait for rank 0.

``torchrun --nproc-per-node N -m jobembed finetune RUN`` (or ``accelerate launch -m jobembed ...``) starts N copies
of the same command. Only the ``finetune`` stage runs on all of them (SentenceTransformerTrainer does DDP from the
launcher's environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``). Every other stage runs on rank 0
alone, and only rank 0 writes stamps, the manifest, the run's config and cache entries: the other ranks wait for it
at the fine-tune, take its word on whether the stage is current, and stop after it.

Without a launcher (no ``WORLD_SIZE``, or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

# Ranks > 0 wait at the fine-tune for rank 0 to finish the stages before it (an LLM judge can take hours). A rank
# that fails makes torchrun stop the others, so a long timeout does not leave processes hanging.
WAIT = timedelta(hours=12)


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0: the process that runs the single-process stages and writes the run's records."""
    return rank() == 0


def _state(*, cpu: bool):
    # accelerate's PartialState picks the backend (gloo on CPU, nccl on CUDA) and sets the device; it is a shared
    # singleton, so the Trainer later finds the same process group.
    from accelerate import PartialState

    return PartialState(cpu=cpu, timeout=WAIT)


def wait_for_everyone(*, cpu: bool) -> None:
    """A barrier over all ranks (no-op without a launcher)."""
    if world_size() > 1:
        _state(cpu=cpu).wait_for_everyone()


def from_main(value: Any, *, cpu: bool) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if world_size() <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    _state(cpu=cpu)
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
