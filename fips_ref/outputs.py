"""Output files: written whole or not at all, and nothing left behind (docs/robustness.md).

Every file fips_ref writes goes to a hidden temporary file beside its destination
(``.tmp-XXXXXXXX-NAME``), every byte checked, flushed and fsynced, then renamed over the
destination. Inside ``all_or_nothing()`` the renames wait until the block ends without error,
so a run's outputs appear together or not at all. Temporary files and folders are recorded in
a registry as they are created; ``remove_leftovers()`` deletes whatever is still there (the CLIs
call it on every abnormal exit, fips_ref.cli.run_cli). An OSError while writing names the
destination, never the temporary name.
"""
import contextlib
import errno
import io
import json
import os
import secrets
import shutil
import signal

import numpy as np

_LEFTOVERS = {}          # path -> True for a folder, False for a file: temporaries that exist
_STAGED = []             # one list of (tmp, dest) per open all_or_nothing() block


# ----------------------------------------------------------------------------- registry
def _new_temp(folder, name, make):
    """Create a fresh temporary ``folder/.tmp-XXXXXXXX-name`` with ``make(path)``; registered
    before it exists, so a signal at any moment leaves nothing the registry does not know."""
    for _ in range(100):
        path = os.path.join(folder, f"{name[0]}{secrets.token_hex(4)}-{name[1][-100:]}")
        _LEFTOVERS[path] = make is os.mkdir
        try:
            make(path)
            return path
        except FileExistsError:
            del _LEFTOVERS[path]
    raise FileExistsError(errno.EEXIST, "cannot create a temporary name", folder)


def temp_folder(folder, prefix):
    """A new registered folder ``folder/PREFIXxxxxxxxx-`` (e.g. the on-disk activation store)."""
    return _new_temp(folder, (prefix, ""), os.mkdir)


def discard(path):
    """Delete a registered temporary file or folder (missing is fine) and forget it."""
    is_dir = _LEFTOVERS.pop(path, False)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path, ignore_errors=True) if is_dir else os.unlink(path)


def remove_leftovers():
    """Delete every registered temporary still on disk; True when there was one."""
    paths = list(_LEFTOVERS)
    for path in paths:
        discard(path)
    for staged in _STAGED:
        staged.clear()
    return bool(paths)


# ----------------------------------------------------------------------------- checked writes
def _os_write(fd, data):
    """os.write; a seam so tests can simulate a full disk or short writes."""
    return os.write(fd, data)


def write_all(fd, data):
    """Write every byte of ``data`` at fd's position; a write that makes no progress is ENOSPC."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = _os_write(fd, view[done:])
        if not n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
    return done


class CheckedFile:
    """The binary file object ``write(f)`` callbacks receive: unbuffered, seekable, and it
    remembers how far it wrote so the final size can be verified."""

    def __init__(self, fd):
        self.fd, self.pos, self.end = fd, 0, 0

    def write(self, data):
        n = write_all(self.fd, data)
        self.pos += n
        self.end = max(self.end, self.pos)
        return n

    def seek(self, offset, whence=os.SEEK_SET):
        self.pos = os.lseek(self.fd, offset, whence)
        return self.pos

    def tell(self):
        return self.pos

    def read(self, *args):              # present so np.savez takes this for a file object
        raise io.UnsupportedOperation("write-only file")

    def seekable(self):
        return True

    def writable(self):
        return True

    def flush(self):
        pass


def _named(e, dest):
    """The OSError ``e`` re-raised under the user's path ``dest``."""
    return OSError(e.errno, e.strerror or str(e), dest)


def _write_temp(dest, write):
    """``write(f)`` into a new registered temporary beside ``dest``; returns its path."""
    folder = os.path.dirname(os.path.abspath(dest))
    fd = None

    def create(path):
        nonlocal fd
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)

    try:
        tmp = _new_temp(folder, (".tmp-", os.path.basename(dest)), create)
    except OSError as e:
        raise _named(e, dest) from None
    try:
        f = CheckedFile(fd)
        write(f)
        os.fsync(fd)                                  # a full disk can surface only here
        size = os.fstat(fd).st_size
        if size != f.end:
            raise OSError(errno.EIO, f"only {size} of {f.end} bytes reached the disk")
    except OSError as e:
        os.close(fd)
        discard(tmp)
        raise _named(e, dest) from None
    except BaseException:
        os.close(fd)
        discard(tmp)
        raise
    os.close(fd)
    return tmp


@contextlib.contextmanager
def _signals_held():
    """SIGINT/SIGTERM wait while the renames run (delivered right after)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    block = getattr(signal, "pthread_sigmask", None)
    old = block(signal.SIG_BLOCK, sigs) if block else None
    try:
        yield
    finally:
        if block:
            block(signal.SIG_SETMASK, old)


def _rename_all(staged):
    """Move every staged temporary onto its destination."""
    with _signals_held():
        for tmp, dest in staged:
            try:
                os.replace(tmp, dest)
            except OSError as e:
                raise _named(e, dest) from None
            _LEFTOVERS.pop(tmp, None)
        staged.clear()


@contextlib.contextmanager
def all_or_nothing():
    """Inside this block, write_atomic stages files; they are renamed into place together when
    the block ends without error, and deleted when it does not."""
    staged = []
    _STAGED.append(staged)
    try:
        yield
        _rename_all(staged)
    finally:
        _STAGED.remove(staged)
        for tmp, _ in staged:                         # left only when something failed
            discard(tmp)


def write_atomic(path, write):
    """Call ``write(f)`` on a temporary file beside ``path`` and rename it to ``path`` (at the
    end of the enclosing all_or_nothing() block, if any). Returns the path where the bytes
    are now, for reading them back before the block ends."""
    path = os.fspath(path)
    tmp = _write_temp(path, write)
    if _STAGED:
        _STAGED[-1].append((tmp, path))
        return tmp
    _rename_all([(tmp, path)])
    return path


def save_npz_atomic(path, arrays):
    """Write ``arrays`` to ``path`` as an uncompressed .npz, atomically (see write_atomic)."""
    return write_atomic(path, lambda f: np.savez(f, **arrays))


def save_json_atomic(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically (see write_atomic)."""
    return write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))
