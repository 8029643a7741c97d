"""The processes of an ``accelerate launch`` (or torchrun) job: which one this is, its device, a barrier.

A stage run by one process sees none of this: rank 0 of 1, its configured device, no barrier. Under a launch
with several processes, each places its models on its own GPU (``cuda`` becomes ``cuda:<LOCAL_RANK>``; a
device with an index is kept as given), one process (rank 0) writes each shared file, and the others wait at
:func:`wait_for_every_process` before they read what it wrote.
"""

from __future__ import annotations

import os


def world_size() -> int:
    """How many processes the job has (1 outside a launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True for the job's rank 0, and for a process that is not part of a launch."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device(device: str) -> str:
    """``device`` for this process: a bare ``cuda`` is this process's own GPU under a launch (LOCAL_RANK)."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def wait_for_every_process(device: str) -> None:
    """A barrier across the job's processes (over gloo for a CPU run, NCCL on GPUs); returns at once with one.

    ``device`` is the run's ``model.device``. Before trl's trainer exists, accelerate's process group is started
    here the way trl's ``use_cpu`` will ask for it (``PartialState(cpu=True)`` for a CPU run, whatever GPUs the
    machine has; without it accelerate would not start a group of CPU processes at all). A process that raises
    between two barriers leaves the others waiting until the launcher stops them (torchrun does)."""
    if world_size() > 1:
        import torch.distributed as distributed
        from accelerate import PartialState

        if not distributed.is_initialized():
            PartialState(cpu=device == "cpu")
        distributed.barrier()
