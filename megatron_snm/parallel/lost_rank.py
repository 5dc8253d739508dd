"""A lost rank ends the others with one line: which rank, and what to do.

When a rank dies (killed, out of memory, its node gone) the others fail inside their next
collective with the backend's error (gloo: "Connection closed by peer" / "Connection reset by
peer" under a 40-line traceback); when it stops answering (SIGSTOP, a hang) they wait
--distributed-timeout-minutes and fail with "Timed out waiting ...". `lost_rank_message` tells
those errors from any other RuntimeError and words them as one line naming the rank:
`record_peers()` (one all-gather at start-up) keeps every rank's host and pid, so a survivor can
see which rank on its own node has exited or is stopped; a rank on another node is named by
its address when the error gives one.
"""
from __future__ import annotations

import os
import re
import socket

import psutil
import torch.distributed as dist

EXIT_LOST_RANK = 5  # another rank died or stopped answering: resume with --load
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it

# Backend errors that mean "a peer went away" (gloo, NCCL, the TCP store), and "a peer stopped answering".
_CLOSED = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Connection refused|remote process exited"
                     r"|NCCL communicator was aborted|Socket closed", re.IGNORECASE)
_TIMED_OUT = re.compile(r"Timed out waiting|Socket Timeout|operation timeout|timed out after|wait timeout",
                        re.IGNORECASE)
_PEER_ADDRESS = re.compile(r"\[(\d+\.\d+\.\d+\.\d+|[0-9a-f:]+)\]:(\d+)")

_peers: list[tuple[str, int]] = []  # (host, pid) of every rank, by rank
_timeout_minutes: list[float] = []  # the run's --distributed-timeout-minutes, for the message


def record_peers(timeout_minutes: float | None = None) -> None:
    """Every rank's host and pid, for naming a lost one later (collective, every rank)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), os.getpid()))
    _peers[:] = everyone
    _timeout_minutes[:] = [timeout_minutes] if timeout_minutes else []


def _local_fate(pid: int) -> str | None:
    """'exited' / 'stopped' for a process of this host that is gone or stopped, else None."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "exited"
    if status == psutil.STATUS_ZOMBIE:
        return "exited"
    if status in (psutil.STATUS_STOPPED, getattr(psutil, "STATUS_TRACING_STOP", "tracing-stop")):
        return "stopped (SIGSTOP or a debugger)"
    return None


def lost_ranks() -> list[str]:
    """'rank R (pid P) exited' for each rank of this host that exited or is stopped."""
    host, me = socket.gethostname(), os.getpid()
    found = []
    for rank, (peer_host, pid) in enumerate(_peers):
        if peer_host == host and pid != me and (fate := _local_fate(pid)):
            found.append(f"rank {rank} (pid {pid} on {host}) {fate}")
    return found


def lost_rank_message(err: BaseException) -> str | None:
    """One line for an error that means another rank was lost, or None for any other error."""
    text = str(err)
    match = _TIMED_OUT.search(text) or _CLOSED.search(text)
    if not isinstance(err, RuntimeError) or not match:
        return None
    timed_out = match.re is _TIMED_OUT
    me = f"rank {dist.get_rank()}" if dist.is_available() and dist.is_initialized() else "this rank"
    named = lost_ranks()
    if not named:
        address = _PEER_ADDRESS.search(text)
        named = [f"a rank at {address.group(1)}:{address.group(2)}" if address else "another rank"]
    if timed_out:
        what = (f"{', '.join(named)}: no answer within --distributed-timeout-minutes"
                + (f" ({_timeout_minutes[0]:g})" if _timeout_minutes else ""))
        advice = "End or resume the stopped rank (kill -CONT), or raise --distributed-timeout-minutes if it was busy"
    else:
        what = f"lost {', '.join(named)} (the connection to it closed)"
        advice = "See that rank's own output for why it ended"
    return f"{what}; {me} stops here ({match.group(0)}). {advice}, then run again with --load to resume"
