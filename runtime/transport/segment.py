"""A shared-memory segment: a file under ``shm_dir`` mapped with ``mmap``.

Why not ``multiprocessing.shared_memory``: on Python < 3.13 its resource
tracker unlinks segments that other processes still use.  Here the creator
owns the name: ``unlink()`` removes it once, ``close()`` only detaches, and
nothing happens in ``__del__``.

Space is reserved with ``posix_fallocate`` at creation, so a full ``/dev/shm``
(Docker's default is 64 MiB) fails here with a :class:`TransportError` that
names the directory, the bytes asked for and the bytes free -- never with a
SIGBUS on first touch of an unbacked page later.

Sealed segments (:meth:`Segment.create_sealed`), for channels with an
untrusted peer.  Whoever holds a segment's descriptor can ``ftruncate`` it, and
the other side's next access to a page past the new end raises SIGBUS, which
ends the process.  A memfd sealed with ``F_SEAL_SHRINK | F_SEAL_GROW`` cannot
change size, through any descriptor, its creator's included; a receiver checks
the seals (:func:`is_sealed`) before it maps a segment from a peer it does not
trust.  Seals exist only on memfds, so a sealed segment lives in the kernel's
internal tmpfs: it counts against memory, not against ``shm_dir``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import secrets

from runtime.errors import ProtocolError, TransportError
from runtime.transport import hostmem

__all__ = ["SEALS", "Segment", "is_sealed", "memfd", "unlink_quietly"]

PREFIX = "rt_"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
"""The seals a sealed segment carries (with ``F_SEAL_SEAL``) and a receiver requires."""
MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)  # Linux 6.3; Python 3.12 names it


def memfd(name: str) -> int:
    """A new sealable memfd (close-on-exec) that can never be made executable.

    With ``MFD_NOEXEC_SEAL`` where the kernel knows it: since Linux 6.3 a
    ``memfd_create`` without it (or ``MFD_EXEC``) logs a warning, and is
    refused outright under ``vm.memfd_noexec=2``.  An older kernel rejects the
    flag with ``EINVAL``; then a plain sealable memfd.
    """
    try:
        return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


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
        hostmem.mapped(self.address, self.size)
        self._unlinked = False
        self.fd: int | None = None  # kept only by anonymous segments until handed over

    @classmethod
    def create_anonymous(cls, shm_dir: str, size: int) -> Segment:
        """A segment with no name: an ``O_TMPFILE`` inode in ``shm_dir``'s filesystem.

        It counts against ``shm_dir``'s space like a named file (so a full
        ``/dev/shm`` still fails here), but no process can open it by name:
        the only way in is the descriptor kept in :attr:`fd`, which the
        creator hands to its peer (``SCM_RIGHTS``) and then releases with
        :meth:`release_fd`.  Nothing is left behind by any crash.  On a
        filesystem without ``O_TMPFILE`` the file is created under a random
        name and unlinked at once, before anyone is told of it.
        """
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        try:
            fd = os.open(shm_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise TransportError(f"cannot create a segment in {shm_dir}: "
                                     f"{exc.strerror}") from exc
            path = os.path.join(shm_dir, f"{PREFIX}anon_{secrets.token_hex(16)}")
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as exc2:
                raise TransportError(f"cannot create segment {path}: {exc2.strerror}") from exc2
            unlink_quietly(path)
        try:
            _reserve(fd, size, shm_dir, f"an anonymous segment in {shm_dir}")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        seg = cls(f"<anonymous in {shm_dir}>", mm, owner=False)
        seg.fd = fd
        seg._unlinked = True  # there is no name to remove
        return seg

    @classmethod
    def create_sealed(cls, size: int) -> Segment:
        """A nameless segment no process can resize: a memfd sealed with :data:`SEALS`.

        Like :meth:`create_anonymous` (hand :attr:`fd` to the peer, then
        :meth:`release_fd`), but in memory rather than ``shm_dir``, and safe to
        share with a peer that would truncate it (module docstring).
        """
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        try:
            fd = memfd("rt_sealed")
        except (AttributeError, OSError) as exc:
            raise TransportError(f"cannot create a sealed segment: {exc}") from exc
        try:
            _reserve(fd, size, "memory", "a sealed segment")
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise TransportError(f"cannot make a sealed segment of {size} bytes: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        seg = cls("<sealed>", mm, owner=False)
        seg.fd = fd
        seg._unlinked = True  # there is no name to remove
        return seg

    @classmethod
    def from_fd(cls, fd: int, *, sealed: bool = False) -> Segment:
        """Map the segment behind ``fd`` (received from its creator); closes ``fd``.

        ``sealed``: the creator is not trusted, so the segment must carry
        :data:`SEALS` (``ProtocolError`` otherwise): it could truncate it under
        the mapping.
        """
        try:
            if sealed and not is_sealed(fd):
                raise ProtocolError("an untrusted peer's segment is not sealed against "
                                    "resizing (F_SEAL_SHRINK | F_SEAL_GROW)")
            size = os.fstat(fd).st_size
            if size <= 0:
                raise TransportError("a received segment is empty")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise TransportError(f"cannot map a received segment: {exc}") from exc
        finally:
            os.close(fd)
        seg = cls("<received>", mm, owner=False)
        seg._unlinked = True
        return seg

    def release_fd(self) -> None:
        """Close the descriptor of an anonymous segment once its peer has it."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

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
            _reserve(fd, size, shm_dir, path)
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
        self.release_fd()
        mm, self._mm = self._mm, None
        if mm is None:
            return
        hostmem.unmapping(self.address)
        try:
            self.view.release()
        except BufferError:  # views lent to a receiver are still alive; let GC unmap
            pass
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


def is_sealed(fd: int) -> bool:
    """True when the file behind ``fd`` is a plain memfd that can never change size.

    It must carry :data:`SEALS` and live on the kernel's internal shmem mount.

    A ``MFD_HUGETLB`` memfd takes the same seals but is refused: the seals do not stop
    ``fallocate(FALLOC_FL_PUNCH_HOLE)``, which on hugetlbfs frees the huge page *and its
    reservation*, so the other side's next fault can find no huge page and get SIGBUS.
    On shmem a punched page just comes back as zeros.
    """
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
            return False
        dev = os.fstat(fd).st_dev
    except OSError:  # not a memfd: no seals at all
        return False
    return dev == _memfd_dev()


_memfd_st_dev: int | None = None


def _memfd_dev() -> int | None:
    """``st_dev`` of a plain memfd (every one lives on the kernel's one internal shmem mount)."""
    global _memfd_st_dev
    if _memfd_st_dev is None:
        try:
            fd = memfd("rt_probe")
        except (AttributeError, OSError):
            return None  # refuse for now; try again next time
        try:
            _memfd_st_dev = os.fstat(fd).st_dev
        finally:
            os.close(fd)
    return _memfd_st_dev


def unlink_quietly(path: str) -> None:
    """Remove ``path``; a file already gone is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _reserve(fd: int, size: int, shm_dir: str, what: str) -> None:
    """Back ``size`` bytes now, so a full directory fails here and never as a SIGBUS."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            free = _free_bytes(shm_dir)  # -1 for "memory" (a sealed segment) or an error
            raise TransportError(
                f"no room in {shm_dir} for a {size}-byte segment"
                + (f": {free} bytes free" if free >= 0 else "")) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise TransportError(f"cannot reserve {size} bytes in {what}: "
                                 f"{exc.strerror}") from exc
        os.ftruncate(fd, size)  # filesystems without fallocate


def _free_bytes(directory: str) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize
