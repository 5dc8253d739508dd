"""Files that appear only when complete: write under a temporary name, fsync, rename, fsync the
directory.

    write_atomically(path, b"...")                  # or a callable that writes to the open file
    publish_together([(bin_tmp, bin), (idx_tmp, idx)])   # a set of files, the last one decisive
    publish_directory(tmp_dir, final_dir)           # a directory of files, as one

Every published file gets the mode a plain `open` would give it (0666 less the umask), whatever
wrote the temporary: libraries that write through a private temporary file (safetensors does)
leave it 0600, which a serving account could not read.

A temporary is named `<final name>.tmp-<host>-<pid>-<random>`, so a later run can tell one left
by a dead process (same host, pid gone: `clear_stale_temporaries` removes it) from one still
being written (refused, never removed).
"""
from __future__ import annotations

import dataclasses
import errno
import glob
import os
import re
import secrets
import socket
from typing import Callable, Sequence

_HOST = socket.gethostname().replace("/", "_")
_TEMPORARY = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")


def temporary_path(path: str) -> str:
    """A fresh temporary name beside `path`, unique to this process and call."""
    return f"{path}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_dir(path: str) -> None:
    """Makes the renames in directory `path` durable."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_file_mode() -> int:
    """0666 less the process's umask: the mode `open(path, "w")` creates a file with."""
    try:
        with open("/proc/self/status") as f:  # reads the umask without changing it (Linux >= 4.7)
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def give_default_mode(path: str) -> None:
    """Sets a temporary file's permission bits to default_file_mode() before it is published."""
    os.chmod(path, default_file_mode())


def write_atomically(path: str, content: bytes | str | Callable) -> None:
    """Writes `content` (bytes, text, or a callable given the open binary file) to `path`:
    readers see the old file or the whole new one, never a part; no temporary is left behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "xb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        give_default_mode(tmp)
        os.replace(tmp, path)
        fsync_dir(directory)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def publish_together(renames: Sequence[tuple[str, str]], replace: bool = True) -> None:
    """Renames each complete temporary onto its final name, as one set.

    The last final name is the decisive one (for a dataset the `.idx`: a `.bin` alone is not a
    dataset). It is removed first and renamed last, so no moment shows an old decisive file
    beside a new partner; everything is fsynced before the first old file is touched, so the
    set is replaced only once the new one is complete. With replace=False, a final name that
    exists (say, another run published there meanwhile) raises FileExistsError and nothing of
    it is touched: hard links make "create unless present" atomic.
    """
    for tmp, _ in renames:
        give_default_mode(tmp)
        fsync_file(tmp)
    if replace:
        decisive = renames[-1][1]
        if os.path.lexists(decisive):
            os.remove(decisive)
        for tmp, final in renames:
            os.replace(tmp, final)
    else:
        _link_all_or_none(renames)
    for directory in {os.path.dirname(os.path.abspath(final)) for _, final in renames}:
        fsync_dir(directory)


def publish_directory(tmp_dir: str, final_dir: str) -> None:
    """Renames the complete directory `tmp_dir` (written by this process) onto `final_dir`, which
    must not exist or be an empty directory: nothing the user had is replaced. Every file in it
    gets default_file_mode() and is fsynced first. Raises FileExistsError, touching nothing, when
    `final_dir` holds anything (or is a file or a symbolic link)."""
    for root, _, files in os.walk(tmp_dir):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                give_default_mode(path)
                fsync_file(path)
        fsync_dir(root)
    if os.path.islink(final_dir) or (os.path.lexists(final_dir) and not os.path.isdir(final_dir)):
        raise FileExistsError(errno.EEXIST, "exists and is not a directory", final_dir)
    try:
        os.rename(tmp_dir, final_dir)  # onto an empty directory or nothing; ENOTEMPTY otherwise
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "exists and is not empty", final_dir) from None
        raise
    fsync_dir(os.path.dirname(os.path.abspath(final_dir)))


def _link_all_or_none(renames: Sequence[tuple[str, str]]) -> None:
    linked = []
    try:
        for tmp, final in renames:
            try:
                os.link(tmp, final)  # fails if final exists, atomically
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, "File exists", final) from None
            except OSError:  # a filesystem without hard links: check, then rename
                if os.path.lexists(final):
                    raise FileExistsError(errno.EEXIST, "File exists", final) from None
                os.replace(tmp, final)
            linked.append(final)
    except FileExistsError:
        for final in linked:
            os.remove(final)
        raise
    for tmp, _ in renames:
        if os.path.lexists(tmp):
            os.remove(tmp)


@dataclasses.dataclass
class Temporary:
    path: str
    host: str
    pid: int

    @property
    def owner_alive(self) -> bool:
        """True unless the owner is known dead: on another host we cannot tell."""
        if self.host != _HOST:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        return True


class TemporaryInUse(FileExistsError):
    """A temporary of `path` belongs to a process that may still be writing it."""


def temporaries_of(path: str) -> list[Temporary]:
    found = []
    for candidate in sorted(glob.glob(glob.escape(path) + ".tmp-*")):
        match = _TEMPORARY.search(candidate[len(path):])
        if match:
            found.append(Temporary(candidate, match["host"], int(match["pid"])))
    return found


def clear_stale_temporaries(path: str, log: Callable[[str], None]) -> list[str]:
    """Removes the temporaries of `path` left by dead processes, logging each; raises
    TemporaryInUse, removing nothing, if one may belong to a running process."""
    found = temporaries_of(path)
    for tmp in found:
        if tmp.owner_alive:
            where = "this process" if tmp.pid == os.getpid() and tmp.host == _HOST else f"process {tmp.pid} on {tmp.host}"
            raise TemporaryInUse(
                f"{tmp.path}: being written by {where}, which is still running; wait for it, or remove "
                "the file if that process is not writing here"
            )
    for tmp in found:
        os.remove(tmp.path)
        log(f"removed {tmp.path}, left by an interrupted run (process {tmp.pid} on {tmp.host})")
    return [tmp.path for tmp in found]
