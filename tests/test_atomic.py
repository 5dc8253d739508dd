"""megatron_snm/atomic.py: a file or a set of files appears whole or not at all, and temporaries
are told apart: a dead process's are removed (logged), a live one's are never touched."""
import os
import socket
import subprocess
import sys

import pytest

from megatron_snm import atomic


def test_write_atomically_writes_bytes_text_or_a_callable_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "f"
    atomic.write_atomically(str(path), b"bytes")
    assert path.read_bytes() == b"bytes"
    atomic.write_atomically(str(path), "text")
    assert path.read_text() == "text"
    atomic.write_atomically(str(path), lambda f: f.write(b"written by a callable"))
    assert path.read_bytes() == b"written by a callable"
    assert os.listdir(path.parent) == ["f"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write_atomically(str(path), fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_publish_together_replaces_the_whole_set(tmp_path):
    for name, content in (("d.bin", b"old bin"), ("d.idx", b"old idx")):
        (tmp_path / name).write_bytes(content)
    renames = []
    for name, content in (("d.bin", b"new bin"), ("d.idx", b"new idx")):
        tmp = atomic.temporary_path(str(tmp_path / name))
        open(tmp, "wb").write(content)
        renames.append((tmp, str(tmp_path / name)))
    # Until published, the old pair is untouched beside the complete temporaries.
    assert (tmp_path / "d.bin").read_bytes() == b"old bin" and (tmp_path / "d.idx").read_bytes() == b"old idx"
    atomic.publish_together(renames)
    assert (tmp_path / "d.bin").read_bytes() == b"new bin" and (tmp_path / "d.idx").read_bytes() == b"new idx"
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed_with_a_log_line(tmp_path):
    path = str(tmp_path / "d.bin")
    host, pid = socket.gethostname(), dead_pid()
    stale = [f"{path}.tmp-{host}-{pid}-0123abcd", f"{path}.tmp-{host}-{pid}-89abcdef"]
    for p in stale:
        open(p, "w").close()
    unrelated = [path, f"{path}.tmp", str(tmp_path / "other.bin.tmp-h-1-0123abcd")]
    for p in unrelated:
        open(p, "w").close()
    logged = []
    assert atomic.clear_stale_temporaries(path, logged.append) == stale
    assert logged == [f"removed {p}, left by an interrupted run (process {pid} on {host})" for p in stale]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in unrelated)


@pytest.mark.parametrize("owner", ["this process", "another host"])
def test_a_temporary_that_may_be_in_use_is_refused_and_nothing_removed(tmp_path, owner):
    path = str(tmp_path / "d.bin")
    host, pid = (socket.gethostname(), os.getpid()) if owner == "this process" else ("elsewhere", dead_pid())
    dead = f"{path}.tmp-{socket.gethostname()}-{dead_pid()}-00000000"
    busy = f"{path}.tmp-{host}-{pid}-0123abcd"
    for p in (dead, busy):
        open(p, "w").close()
    with pytest.raises(atomic.TemporaryInUse, match="still running"):
        atomic.clear_stale_temporaries(path, print)
    assert os.path.exists(dead) and os.path.exists(busy)


def test_temporary_names_are_unique_and_recognised(tmp_path):
    path = str(tmp_path / "d.idx")
    names = {atomic.temporary_path(path) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        open(name, "w").close()
    found = atomic.temporaries_of(path)
    assert {t.path for t in found} == names and {t.pid for t in found} == {os.getpid()}


def test_publish_without_replace_never_clobbers_and_leaves_nothing_half_done(tmp_path):
    (tmp_path / "d.idx").write_bytes(b"someone else's")
    renames = []
    for name in ("d.bin", "d.idx"):
        tmp = atomic.temporary_path(str(tmp_path / name))
        open(tmp, "wb").write(b"ours")
        renames.append((tmp, str(tmp_path / name)))
    with pytest.raises(FileExistsError) as err:
        atomic.publish_together(renames, replace=False)
    assert err.value.filename == str(tmp_path / "d.idx")
    # The .bin linked before the clash is taken back; the other run's file is untouched.
    assert not (tmp_path / "d.bin").exists() and (tmp_path / "d.idx").read_bytes() == b"someone else's"
    (tmp_path / "d.idx").unlink()
    atomic.publish_together(renames, replace=False)
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"] and (tmp_path / "d.idx").read_bytes() == b"ours"


def test_published_files_get_the_umask_mode_whatever_wrote_them(tmp_path):
    """A library that writes through a private temporary (safetensors: mode 0600) must not leave a
    published file unreadable to others: publishing gives 0666 less the umask, as open() would."""
    old = os.umask(0o022)
    try:
        private = tmp_path / "a.tmp-x"
        private.write_bytes(b"weights")
        private.chmod(0o600)
        atomic.publish_together([(str(private), str(tmp_path / "a"))])
        assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
        atomic.write_atomically(str(tmp_path / "b"), b"x")
        assert (tmp_path / "b").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic.default_file_mode() == 0o600
    finally:
        os.umask(old)


def test_publish_directory_never_replaces_what_is_there(tmp_path):
    def written(name):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"w")
        (d / "model.safetensors").chmod(0o600)
        return d

    atomic.publish_directory(str(written("t1")), str(tmp_path / "out"))  # onto nothing
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~atomic_umask()
    (tmp_path / "empty").mkdir()
    atomic.publish_directory(str(written("t2")), str(tmp_path / "empty"))  # onto an empty directory
    assert (tmp_path / "empty" / "model.safetensors").exists()
    (tmp_path / "file").write_text("the user's")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for taken in ("out", "file", "link"):  # a directory with files, a file, a symbolic link
        with pytest.raises(FileExistsError):
            atomic.publish_directory(str(written(f"t-{taken}")), str(tmp_path / taken))
        assert (tmp_path / f"t-{taken}").is_dir()  # the caller's temporary is left for it to remove
    assert (tmp_path / "file").read_text() == "the user's" and os.readlink(tmp_path / "link") == str(tmp_path / "elsewhere")


def atomic_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
