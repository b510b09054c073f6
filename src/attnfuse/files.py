"""Writing files so that a reader finds the old version or the new one: never a mix, never a fragment.

Every file attnfuse writes goes through :func:`atomic_file` (or its shorthands :func:`write_bytes`,
:func:`write_text`, :func:`write_json`); a directory written as a whole (a model directory, an
``explain`` report) goes through :func:`transaction`::

    with transaction("runs/x") as tmp:         # locks runs/x and proves it writable, before any work
        write_json(tmp / "config.json", config)
        ...                                    # on success runs/x is replaced in one step; on an
                                               # exception (Ctrl-C, SIGTERM, a full disk) it is untouched

How, and why:

* Temporaries live beside their target (same file system, so ``rename`` is atomic) under names
  that say what they are, ``.NAME.XXXXXXXX.tmp``. Their writer holds an ``flock`` on each while it
  lives; the kernel drops it when the process dies, even by SIGKILL. So a temporary nobody holds is
  debris of a killed writer, and the next write to ``NAME`` removes it (:func:`remove_debris`).
* Files are fsynced before the rename and their directory after it: after a power cut the name
  holds the old bytes or the new ones, not an empty file.
* New files get the mode the umask gives (0644 under umask 022), as ``open`` would; ``mkstemp``
  alone would leave 0600 and make a model unreadable to colleagues and service accounts.
* A directory is swapped in with ``renameat2(RENAME_EXCHANGE)`` where the kernel has it (Linux >=
  3.15): readers see the old directory or the new one, never neither. Elsewhere two renames leave an
  instant in which the name is absent.
* A second writer into the same directory fails at once, naming the process that holds it
  (``flock`` on ``.NAME.lock`` beside it), instead of both "succeeding" and the last one winning.
* JSON is strict (``allow_nan=False``): NaN and inf are not JSON; Python's ``json`` would write them
  as bare ``NaN`` that other parsers reject. :func:`to_json` names where such a value is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; writes stay atomic, but locks and debris detection are off
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BusyError",
    "atomic_file",
    "write_bytes",
    "write_text",
    "write_json",
    "to_json",
    "transaction",
    "lock",
    "new_directories",
    "check_writable",
    "remove_debris",
    "file_mode",
    "umask",
]


class BusyError(OSError):
    """Another process is writing the same output (it holds the lock beside it)."""


# ---------------------------------------------------------------------------------------------
# Modes


_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it.

    Linux (>= 4.7) shows it in /proc/self/status. Elsewhere the only way is ``os.umask``, which sets
    a new value to return the old one: that is done under a lock and sets the most restrictive
    value (077) for the instant, so a file another thread creates meanwhile is private, never more
    open than the user asked."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file (0o644) or directory (0o755) under umask 022."""
    return (0o777 if directory else 0o666) & ~umask()


# ---------------------------------------------------------------------------------------------
# Temporaries: recognisable names, held by their writer while it lives


def _debris_pattern(target: Path) -> re.Pattern[str]:
    # tempfile's names: 8 characters of [a-z0-9_]. The exact shape matters: the target "a" must not
    # claim the temporaries of a neighbour "a.b" (".a.b.xxxxxxxx.tmp").
    return re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}\.tmp")


def _hold(fd: int, path: str) -> bool:
    """Lock a temporary we just created; False if a cleaner removed it in between (then retry)."""
    if fcntl is None:
        return True
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _new_temp(target: Path, directory: bool) -> tuple[int, Path]:
    """A fresh temporary beside ``target`` with the umask's mode, locked by this process: (fd, path)."""
    kwargs = {"dir": target.parent, "prefix": f".{target.name}.", "suffix": ".tmp"}
    while True:
        path = tempfile.mkdtemp(**kwargs) if directory else None
        try:
            if path is not None:
                fd = os.open(path, os.O_RDONLY)
            else:
                fd, path = tempfile.mkstemp(**kwargs)
        except BaseException:
            if path is not None:
                os.rmdir(path)
            raise
        try:
            if _hold(fd, path):
                os.chmod(path, file_mode(directory))  # mkstemp/mkdtemp create 0600/0700
                return fd, Path(path)
        except BaseException:
            os.close(fd)
            os.rmdir(path) if directory else os.unlink(path)
            raise
        os.close(fd)  # a cleaner took it for debris in the instant before we held it: again


def remove_debris(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of ``target`` left beside it (those no live
    process holds); return what was removed."""
    target = Path(target)
    if fcntl is None:
        return []
    pattern, removed = _debris_pattern(target), []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    for name in filter(pattern.fullmatch, names):
        path = target.parent / name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live writer's, leave it
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------------------------------------
# Files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory; the rename is still atomic
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _named(e: BaseException, path: Path, tmp: Path | None = None, unnamed: bool = True) -> BaseException:
    """``e`` naming ``path`` (the target) instead of a temporary (or, with ``unnamed``, instead of
    no file at all): "no space left on device: runs/x/model.safetensors" tells the user which file,
    the temporary's name does not. Anything else is returned as it is."""
    if not isinstance(e, OSError) or isinstance(e, BusyError):
        return e
    filename = None if e.filename is None else str(e.filename)
    if filename is None and unnamed:
        filename = str(path)
    elif filename is not None and tmp is not None and (filename == str(tmp) or filename.startswith(f"{tmp}{os.sep}")):
        filename = str(path) + filename[len(str(tmp)) :]
    else:
        return e
    named = OSError(e.errno, e.strerror or str(e), filename)  # the errno's subclass (PermissionError, ...)
    named.__cause__ = e
    return named


@contextlib.contextmanager
def new_directories(directory: Path) -> Iterator[None]:
    """Create ``directory`` and its missing parents (the umask's mode) for the block; when the block
    fails, remove those created that are still empty: a failed write leaves nothing behind."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()][::-1]
    try:
        for p in missing:
            p.mkdir(exist_ok=True)
        yield
    except BaseException:
        for p in reversed(missing):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file object on a temporary beside ``path``; on a clean exit it is fsynced and renamed onto
    ``path`` (a reader finds the old file or the new one), on an exception removed.

    ``mode``: ``"wb"`` or ``"w"`` (UTF-8 text). Missing parent directories are created. An OSError
    names ``path`` (e.g. ``no space left on device: PATH``)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    path = Path(path)
    with new_directories(path.parent):
        try:
            remove_debris(path)
            fd, tmp = _new_temp(path, directory=False)
        except OSError as e:
            raise _named(e, path) from None
        try:
            with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, path)  # still holding the lock: no cleaner can take it for debris
            _fsync_dir(path.parent)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            raise _named(e, path, tmp) from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "w") as f:
        f.write(text)


def to_json(obj: Any) -> str:
    """Strict JSON (2-space indent, final newline). NaN/inf are a ValueError naming where they are:
    JSON has no such numbers (write ``None`` for a value that is undefined)."""
    try:
        return json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError:
        where, value = _non_finite(obj)
        raise ValueError(f"JSON: {where or 'the value'} is {value}, which JSON cannot hold") from None


def _non_finite(obj: Any, where: str = "") -> tuple[str, float] | tuple[None, None]:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if where else str(key))
        if found[0] is not None:
            return found
    return None, None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (:func:`to_json`) to ``path`` atomically."""
    write_text(path, to_json(obj))


def check_writable(path: str | os.PathLike) -> None:
    """Raise the OSError that writing the file ``path`` would raise (no permission, a read-only file
    system, a parent that is a file, a directory in the way), without leaving anything behind: the
    probe is an unnamed temporary file in the nearest existing parent."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(parent)) from None


# ---------------------------------------------------------------------------------------------
# Directories


def _acquire(path: Path, lock_path: Path) -> int:
    """An fd of ``lock_path`` under an exclusive flock, with our process id written in it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise BusyError(
                f"{path}: {who} is writing it (it holds {lock_path}); wait for it to finish or choose another output"
            ) from None
        # The previous holder removes the file when done: make sure we locked the one on disk.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return fd
                except BaseException:
                    lock_path.unlink(missing_ok=True)
                    os.close(fd)
                    raise
        os.close(fd)


@contextlib.contextmanager
def lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``.NAME.lock`` beside ``path`` exclusively for the block (the file is removed after).

    A second holder fails at once with :class:`BusyError` naming the first's process id: two runs
    into one output must not both run to the end and then overwrite each other."""
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    if fcntl is None:
        yield lock_path
        return
    try:
        fd = _acquire(path, lock_path)
    except OSError as e:
        raise _named(e, lock_path) from None
    try:
        yield lock_path
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # C library older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # e.g. a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, out: Path) -> Path | None:
    """Put the directory ``new`` at ``out``; return where the previous ``out`` now is (to delete)."""
    if not out.exists():
        os.rename(new, out)
        return None
    if _exchange(new, out):
        return new  # the old directory now has the temporary's name
    old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")  # a debris name, if we die now
    os.rename(out, old)
    os.rename(new, out)
    return old


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _holds_cwd(directory: Path) -> bool:
    with contextlib.suppress(OSError):
        cwd = Path(os.getcwd())
        return cwd == directory or directory in cwd.parents
    return False


def _carry(out: Path, new: Path, keep: tuple[str, ...]) -> list[str]:
    """Move the entries ``keep`` of ``out`` into ``new`` (not there already); return the names moved.
    A rename moves a symbolic link itself: what it points to is never touched."""
    moved = []
    for name in keep:
        if os.path.lexists(out / name) and not os.path.lexists(new / name):
            os.rename(out / name, new / name)
            moved.append(name)
    return moved


@contextlib.contextmanager
def transaction(
    out: str | os.PathLike, check: Callable[[Path], None] | None = None, keep: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Write the directory ``out`` as one transaction: yields an empty temporary directory beside
    it; when the block ends without an exception, the temporary is fsynced and swapped in for
    ``out`` (whose previous contents are deleted, but for the entries named in ``keep``: those the
    block did not write are moved into the new directory as they are, at the swap, so one made
    while the block ran is kept too). On any exception, Ctrl-C included, ``out`` is untouched and
    the temporary removed; after a SIGKILL the next transaction removes it.

    Before yielding (so before any expensive work): ``out``'s lock is taken (:func:`lock`; a
    concurrent writer fails at once), it is proven writable, and ``check(out)`` is called when
    ``out`` exists (raise there to refuse replacing a directory that is not ours). Parents created
    for it are removed again when the transaction fails. An OSError names ``out``, not the
    temporary."""
    given = Path(out)
    out = Path(os.path.realpath(given))  # a symlink to a run directory: replace its target
    with new_directories(out.parent), lock(out):
        try:
            if out.exists() and not out.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(given))
            if out.exists() and check is not None:
                check(out)
            if _holds_cwd(out):  # replacing it would leave this process in a deleted directory
                raise ValueError(f"{given}: is the current directory or contains it; write into a new directory")
            remove_debris(out)
            fd, tmp = _new_temp(out, directory=True)
        except OSError as e:
            raise _named(e, given) from None
        try:
            try:
                yield tmp
            except BaseException as e:  # the caller's failure: report it as it is (with our names)
                raise _named(e, given, tmp, unnamed=False) from None
            _fsync_tree(tmp)
            carried = _carry(out, tmp, keep) if out.is_dir() else []
            if carried:
                _fsync_dir(tmp)
            try:
                old = _swap_in(tmp, out)
            except BaseException:
                _carry(tmp, out, tuple(carried))  # back where they were, before the temporary goes
                raise
            _fsync_dir(out.parent)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # (after the swap: the old directory)
            raise _named(e, given, tmp) from None
        finally:
            os.close(fd)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # what remains is debris for the next run
