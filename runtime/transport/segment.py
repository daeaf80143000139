"""A shared-memory segment: a file under ``shm_dir`` mapped with ``mmap``.

Why not ``multiprocessing.shared_memory``: on Python < 3.13 its resource
tracker unlinks segments that other processes still use.  Here the creator
owns the name: ``unlink()`` removes it once, ``close()`` only detaches, and
nothing happens in ``__del__``.

Space is reserved with ``posix_fallocate`` at creation, so a full ``/dev/shm``
(Docker's default is 64 MiB) fails here with a :class:`TransportError` that
names the directory, the bytes asked for and the bytes free -- never with a
SIGBUS on first touch of an unbacked page later.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from runtime.errors import TransportError

__all__ = ["Segment", "unlink_quietly"]

PREFIX = "rt_"


class Segment:
    """One mapped shared-memory file.  Create with :meth:`create` or :meth:`attach`."""

    def __init__(self, path: str, mm: mmap.mmap, *, owner: bool) -> None:
        self.path = path
        self.size = len(mm)
        self.owner = owner
        self._mm: mmap.mmap | None = mm
        self._anchor = ctypes.c_char.from_buffer(mm)
        self.address: int = ctypes.addressof(self._anchor)
        self.view = memoryview(mm)
        self._unlinked = False

    @classmethod
    def create(cls, shm_dir: str, name: str, size: int) -> Segment:
        """Create ``shm_dir/name`` (mode 0600, ``O_EXCL``), reserve ``size`` bytes, map it."""
        if not name.startswith(PREFIX):
            raise ValueError(f"segment names start with {PREFIX!r}, got {name!r}")
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise TransportError(f"cannot create segment {path}: {exc.strerror}") from exc
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise TransportError(
                        f"no room in {shm_dir} for a {size}-byte segment: "
                        f"{_free_bytes(shm_dir)} bytes free") from exc
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise TransportError(f"cannot reserve {size} bytes in {path}: "
                                         f"{exc.strerror}") from exc
                os.ftruncate(fd, size)  # filesystems without fallocate
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        os.close(fd)
        return cls(path, mm, owner=True)

    @classmethod
    def attach(cls, path: str) -> Segment:
        """Map an existing segment created by another process."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TransportError(f"cannot open segment {path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size <= 0:
                raise TransportError(f"segment {path} is empty")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(path, mm, owner=False)

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Detach this mapping (idempotent).  The file stays until :meth:`unlink`."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        self.view.release()
        del self._anchor
        try:
            mm.close()
        except BufferError:  # a caller still holds an exported view; let GC unmap
            pass

    def unlink(self) -> None:
        """Remove the file (once; the mapping stays valid until closed)."""
        if not self._unlinked:
            self._unlinked = True
            unlink_quietly(self.path)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Segment {self.path} {self.size} bytes {state}>"


def unlink_quietly(path: str) -> None:
    """Remove ``path``; a file already gone is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _free_bytes(directory: str) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize
