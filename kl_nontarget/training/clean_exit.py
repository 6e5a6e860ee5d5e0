"""A clean end for multi-process (gloo) runs: flush the collectives' worker threads before the interpreter exits.

Why this exists. Gloo runs every collective on worker threads of the process group. When a collective completes,
the waiting Python thread wakes up and usually drops its handle first, so the worker thread releases the last
reference to the collective's tensors. Tensors that Python has seen keep a reference to their Python object, so
that release needs the GIL. If the main thread is already finalising the interpreter at that moment, CPython makes
the worker thread exit inside a C++ destructor, and the process dies with SIGABRT ("terminate called without an
active exception") after the script has otherwise finished: one run in a few on a busy machine, with DDP as with
FSDP2. Calling `destroy_process_group()` does not prevent it while anything (a DDP wrapper, an FSDP mesh) still
holds the group, because the worker threads then keep running.

The cure is to make the last collective's clean-up happen while the interpreter is intact: a barrier on every gloo
group (its handle goes through the same work queue and waits with the GIL released, so every earlier collective is
finished and released before it returns), then `destroy_process_group()`. `release_process_groups()` does that;
the trainers and the `compute_loss_func` hook register it with `atexit` when they run in a gloo process group, so a
user's script needs nothing. Scripts that use torch.distributed without the trainers call it themselves at the end.
"""

from __future__ import annotations

import atexit
import gc
import logging
import sys

logger = logging.getLogger(__name__)

_handler_installed = False


def _gloo_groups() -> list:
    """The live process groups whose backend is gloo (the default group first), or [] when none is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return []
    from torch.distributed.distributed_c10d import _world

    groups = []
    default = dist.group.WORLD
    for group in [default, *[g for g in _world.pg_map if g is not default]]:
        try:
            if dist.get_backend(group) == "gloo":
                groups.append(group)
        except (RuntimeError, ValueError):  # a group this rank is not part of, or one being torn down
            continue
    return groups


def release_process_groups(*, barrier: bool = True) -> bool:
    """Finish every gloo collective and destroy the process groups, while the interpreter is still intact.

    Call it on every rank at the end of a multi-process script (the trainers of this package register it to run at
    exit). With `barrier=False` no rank waits for the others (for an exit after an error); the groups are still
    destroyed. Returns True when gloo groups were found and released. Process groups of other backends (NCCL) are
    left alone.
    """
    import torch.distributed as dist

    groups = _gloo_groups()
    if not groups:
        return False
    if barrier:
        for group in groups:
            try:
                dist.barrier(group=group)
            except RuntimeError as error:  # a peer already gone: nothing left to wait for
                logger.debug("barrier at teardown failed: %s", error)
                break
    dist.destroy_process_group()
    gc.collect()  # groups no longer referenced are destroyed now, joining their worker threads
    return True


def _exiting_after_error() -> bool:
    # An uncaught exception is stored in sys.last_value (sys.last_exc from 3.12) before atexit handlers run.
    return getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None


def _at_exit() -> None:
    try:
        release_process_groups(barrier=not _exiting_after_error())
    except Exception as error:  # never turn a clean exit into a failing one
        logger.debug("releasing process groups at exit failed: %s", error)


def install_exit_handler() -> bool:
    """Register `release_process_groups` with `atexit` once, when this process is part of a gloo process group.

    Returns True when the handler is (or already was) installed.
    """
    global _handler_installed
    if _handler_installed:
        return True
    if not _gloo_groups():
        return False
    atexit.register(_at_exit)
    _handler_installed = True
    return True
