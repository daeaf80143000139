"""Tensor-aware codec: Python objects <-> a small header plus out-of-band buffers.

:func:`encode` turns a message into an :class:`Encoded`: a self-describing
``header`` (never holding tensor or array bytes) and one flat ``uint8`` numpy
buffer per tensor or array.  :func:`decode` takes the header and the buffers,
received by the caller as 1-D ``torch.uint8`` CPU tensors, and reinterprets
the buffers in place (no copy) as tensors and arrays of the declared dtype and
shape.  The codec knows objects, not transports: the channel layer moves the
header and the buffers.

Header layout (little-endian; the fixed part is :data:`HEADER_PREFIX`,
``"<3sBB"``, 5 bytes)::

    offset     size  field
    ------     ----  -----------------------------------------------
    0          3     magic b"RTC"
    3          1     codec version (2)
    4          1     payload format: 0 = plain, 1 = pickle
    5          ...   payload, up to the end of the header

The buffers' count and sizes are not in the header: the framing below carries them
(``runtime/transport/framing.py``), once; :func:`decode` takes the buffers as delivered
and checks each against the descriptor that names it.

Payload formats.  :func:`encode` tries the *plain* format first and falls back
to the *pickle* format when the message holds anything the plain format cannot
express exactly.  ``decode(..., safe=True)`` accepts only the plain format and
never unpickles anything: that is how a TEE treats what a GPU worker sends.

* Plain: a tagged binary format written and read by hand (no pickle, no
  marshal).  One value is a tag byte followed by its body::

      tag  value            body
      ---  ---------------  ----------------------------------------------
      N    None             -
      T    True             -
      F    False            -
      i    int (64-bit)     i64
      I    int (bigger)     u64 length, then that many signed LE bytes
      f    float            f64
      c    complex          f64 real, f64 imaginary
      s    str              u64 length, then UTF-8 (surrogatepass)
      b    bytes/bytearray  u64 length, then the bytes
      l    list             u64 count, then the items
      t    tuple            u64 count, then the items
      d    dict             u64 count, then key, value, key, value, ...
      A    torch.Tensor     u32 buffer index, u8 dtype id, u8 ndim, ndim x i64
      a    numpy.ndarray    u32 buffer index, u8 dtype code, u8 ndim, ndim x i64
      g    numpy scalar     u8 dtype code, then itemsize bytes in that byte order

  Torch dtype ids are :data:`TORCH_DTYPE_IDS`; a numpy dtype code is the id in
  :data:`NUMPY_DTYPE_IDS`, plus 0x80 for big-endian.  Only these exact types
  are plain: subclasses (``IntEnum``, namedtuples, ``OrderedDict``, ``str``
  subclasses, ...) go to the pickle format so that trusted mode keeps their
  type; tensor subclasses such as ``nn.Parameter`` travel as plain tensors.
  A message nesting containers more than :data:`MAX_DEPTH` deep (a cyclic
  one, say) goes to the pickle format; the plain decoder refuses it.
* Pickle: ``cloudpickle`` (so classes and functions defined in ``__main__``
  travel by value) with a ``persistent_id`` hook sending tensors and arrays
  out of band with the same descriptors as the plain format.

Values and their fate:

* A tensor arrives as ``t.detach().cpu().contiguous()`` with conjugate and
  negative bits resolved: on the CPU, contiguous, detached (``requires_grad``
  is not transported); subclasses such as ``nn.Parameter`` arrive as plain
  tensors.  Every dtype in :data:`TORCH_DTYPE_IDS` round-trips bit-exactly.
  Tensors the codec cannot send as one buffer (sparse, quantized or meta
  tensors) are pickled by torch itself, in the pickle format (the dense
  tensors they are made of still travel out of band).
* A numpy array of a numeric, bool or complex dtype (either byte order)
  arrives as a contiguous array of the same dtype and shape; other arrays
  (object, structured, datetime, ``longdouble``) are pickled.  Numpy scalars
  of those dtypes are kept as numpy scalars, in-band (``np.longlong`` arrives
  as ``np.int64``, the same dtype).
* The same tensor or array object appearing several times in one message is
  sent once and decodes to one object appearing several times.  Distinct
  views of one storage are sent as separate buffers: values are right, the
  sharing is not kept.
* ``bytearray`` decodes as ``bytes`` in the plain format.
* A decoded tensor or array shares memory with the buffer it came from (when
  a buffer's storage offset is misaligned for its dtype, the tensor is copied).

Errors.  :func:`decode` raises only :class:`~runtime.errors.ProtocolError`
(a :class:`~runtime.errors.TransportError`) for malformed input, naming the
defect; it never allocates more than the header declares and the frame holds.
:func:`encode` raises ``TypeError`` naming the offending type when a value can
be encoded in neither format (a user error, not a transport error), and
``TransportError`` when a value nests deeper than pickle can follow.
"""

from __future__ import annotations

import io
import itertools
import pickle
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import cloudpickle
import numpy as np
import torch

from runtime.errors import ProtocolError, TransportError, exception_reduction

__all__ = [
    "DEVICE_WRITTEN",
    "FORMAT_PICKLE",
    "FORMAT_PLAIN",
    "HEADER_PREFIX",
    "MAGIC",
    "MAX_DEPTH",
    "MAX_NDIM",
    "NUMPY_DTYPE_IDS",
    "TORCH_DTYPE_IDS",
    "VERSION",
    "DeferredTensor",
    "DeviceBuffer",
    "Encoded",
    "decode",
    "encode",
    "exception_bytes",
    "trusted_exception",
]

MAGIC = b"RTC"
VERSION = 2
FORMAT_PLAIN = 0
FORMAT_PICKLE = 1
MAX_DEPTH = 100
"""Most containers nested in one another in the plain format."""
MAX_NDIM = 64
# Dict keys whose hash is not randomised (anything but str and bytes) that one safe-mode
# message may hold, and their size in 64-bit words.  An untrusted peer can pick n int keys
# of one hash value (k * (2**61 - 1) + c); building their dict costs n**2 / 2 comparisons,
# each walking the keys, in one C call that holds the GIL (20,000 small keys: 2.5 s;
# 60,000: 26 s of a frozen TEE; 1024 keys of 30 KB: 2.6 s).  At the caps: ~10 ms.
SAFE_HASHED_KEYS = 1024
SAFE_KEY_WORDS = 16384
# Values one message from an untrusted peer may decode to (containers and leaves): each is a
# Python object of 30-100 bytes from as little as 1-3 bytes of header (an empty list, a
# numpy int8), so without a cap a ring record of 20 MiB became hundreds of MiB.  An honest
# worker's reply holds a few dozen; its fullest trace reply (65,536 spans of 5 values) 327,681.
SAFE_MAX_VALUES = 1 << 20
"""Most dimensions of a tensor or array descriptor."""

HEADER_PREFIX = "<3sBB"
"""Struct format of the fixed part: magic, version, payload format."""

_PREFIX = struct.Struct(HEADER_PREFIX)
_PREFIX_LEN = _PREFIX.size  # 5

# Plain-format tags (ASCII letters, readable in a hex dump).
_T_NONE = ord("N")
_T_TRUE = ord("T")
_T_FALSE = ord("F")
_T_INT = ord("i")
_T_BIGINT = ord("I")
_T_FLOAT = ord("f")
_T_COMPLEX = ord("c")
_T_STR = ord("s")
_T_BYTES = ord("b")
_T_LIST = ord("l")
_T_TUPLE = ord("t")
_T_DICT = ord("d")
_T_TENSOR = ord("A")
_T_ARRAY = ord("a")
_T_NPSCALAR = ord("g")

_TAG_Q = struct.Struct("<BQ")  # tag + length/count
_TAG_q = struct.Struct("<Bq")  # tag + int64
_TAG_d = struct.Struct("<Bd")  # tag + float
_TAG_dd = struct.Struct("<Bdd")  # tag + complex
_TAG_B = struct.Struct("<BB")  # tag + dtype code
_DESC = struct.Struct("<BIBB")  # tag + buffer index, dtype id, ndim
_DESC_BODY = struct.Struct("<IBB")
_unpack_i64 = struct.Struct("<q").unpack_from
_unpack_u64 = struct.Struct("<Q").unpack_from
_unpack_d = struct.Struct("<d").unpack_from
_unpack_dd = struct.Struct("<dd").unpack_from
_unpack_desc = _DESC_BODY.unpack_from
_DIMS = [struct.Struct(f"<{n}q") for n in range(MAX_NDIM + 1)]

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1

# Torch dtype ids: ids never change.  Dtypes the installed torch lacks are skipped.
_TORCH_DTYPE_NAMES = (
    (1, "float32"), (2, "float64"), (3, "float16"), (4, "bfloat16"),
    (5, "complex32"), (6, "complex64"), (7, "complex128"), (8, "bool"),
    (9, "uint8"), (10, "int8"), (11, "int16"), (12, "int32"), (13, "int64"),
    (14, "uint16"), (15, "uint32"), (16, "uint64"),
    (17, "float8_e4m3fn"), (18, "float8_e5m2"), (19, "float8_e4m3fnuz"),
    (20, "float8_e5m2fnuz"), (21, "float8_e8m0fnu"), (22, "float4_e2m1fn_x2"),
)  # fmt: skip
TORCH_DTYPE_IDS: dict[torch.dtype, int] = {
    getattr(torch, name): code for code, name in _TORCH_DTYPE_NAMES if hasattr(torch, name)
}
"""Wire id of each torch dtype the codec sends out of band."""
_TORCH_BY_ID: dict[int, tuple[torch.dtype, int]] = {
    code: (dt, dt.itemsize) for dt, code in TORCH_DTYPE_IDS.items()
}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = {}
for _dt in TORCH_DTYPE_IDS:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _TORCH_TO_NUMPY[_dt] = torch.empty(1, dtype=_dt).numpy().dtype
    except TypeError:
        pass  # bfloat16, float8, ...: numpy has no such dtype
del _dt


def _numpy_alias(dt: torch.dtype) -> torch.dtype | None:
    """None if ``t.numpy()`` works for ``dt``, else a same-size dtype for which it does."""
    try:
        with warnings.catch_warnings():  # complex32: "ComplexHalf support is experimental"
            warnings.simplefilter("ignore")
            torch.empty(1, dtype=dt).numpy()
    except TypeError:
        return _SAME_SIZE_INT[dt.itemsize]
    return None


# dtype -> (wire id, alias to view as before .numpy(), or None)
_TORCH_ENC: dict[torch.dtype, tuple[int, torch.dtype | None]] = {
    dt: (code, _numpy_alias(dt)) for dt, code in TORCH_DTYPE_IDS.items()
}

# Numpy dtype ids: ids never change.  The code on the wire is the id, plus 0x80
# for big-endian.
_NUMPY_DTYPE_NAMES = (
    (1, "bool"), (2, "int8"), (3, "uint8"), (4, "int16"), (5, "uint16"),
    (6, "int32"), (7, "uint32"), (8, "int64"), (9, "uint64"),
    (10, "float16"), (11, "float32"), (12, "float64"),
    (13, "complex64"), (14, "complex128"),
)  # fmt: skip
_BIG_ENDIAN = 0x80
NUMPY_DTYPE_IDS: dict[np.dtype, int] = {}
"""Wire code of each numpy dtype (either byte order) the codec sends out of band."""
_NUMPY_BY_CODE: dict[int, np.dtype] = {}
for _code, _name in _NUMPY_DTYPE_NAMES:
    _dt = np.dtype(_name)  # native order: decoded arrays get this very dtype
    if _dt.itemsize == 1:
        _pairs = [(_code, _dt)]
    else:
        _big = sys.byteorder == "big"
        _pairs = [
            (_code, _dt if not _big else _dt.newbyteorder("<")),
            (_code | _BIG_ENDIAN, _dt if _big else _dt.newbyteorder(">")),
        ]
    for _c, _d in _pairs:
        NUMPY_DTYPE_IDS[_d] = _c
        _NUMPY_BY_CODE[_c] = _d
_NUMPY_SCALARS: dict[type, tuple[int, np.dtype]] = {}
_NUMPY_SCALAR_NAMES = (
    "bool_", "byte", "ubyte", "short", "ushort", "intc", "uintc", "int_", "uint", "long",
    "ulong", "longlong", "ulonglong", "half", "single", "double", "csingle", "cdouble",
)  # fmt: skip
for _name in _NUMPY_SCALAR_NAMES:
    _t = getattr(np, _name, None)
    if _t is not None and np.dtype(_t) in NUMPY_DTYPE_IDS:
        _dt = np.dtype(_t)
        _NUMPY_SCALARS[_t] = (NUMPY_DTYPE_IDS[_dt], _dt)
del _code, _name, _dt, _t, _pairs, _c, _d

_TORCH_STRIDED = torch.strided
_UINT8 = torch.uint8
_NDARRAY = np.ndarray
_TENSOR = torch.Tensor
_chain = itertools.chain.from_iterable


class Encoded(NamedTuple):
    """An encoded message, ready for a transport.

    ``header``: self-describing bytes; never holds tensor or array bytes.
    ``buffers``: one per out-of-band buffer, each a 1-D C-contiguous ``uint8``
    numpy array that keeps its source alive, or -- for a tensor on a device in
    :data:`DEVICE_WRITTEN` -- a :class:`DeviceBuffer`, which the transport has
    copy itself straight into the memory reserved for it.
    ``nbytes``: ``len(header)`` plus the size of every buffer.
    """

    header: bytes
    buffers: list[np.ndarray | DeviceBuffer]
    nbytes: int


DEVICE_WRITTEN = frozenset({"cuda"})
"""Device types whose tensors are not brought to the host at encoding (see DeviceBuffer)."""


class DeviceBuffer:
    """A device tensor's bytes, copied device-to-host only where they are going.

    Encoding used to call ``.cpu()``: a host copy the transport then copied again into a
    ring record or pool slot.  Instead the transport calls :meth:`write_into` with a
    ``uint8`` array over the record it reserved, and the device copies straight there
    (at DMA speed when that memory is registered with CUDA, see
    ``runtime/transport/hostmem.py``).  :meth:`host` is for routes that need host memory
    of their own (ZeroMQ frames).  Satisfies ``framing.BufferWriter``.
    """

    __slots__ = ("_u8", "nbytes")

    def __init__(self, t: torch.Tensor) -> None:
        self._u8 = t.reshape(-1).view(torch.uint8)  # t is contiguous: a view, no copy
        self.nbytes = self._u8.numel()

    def write_into(self, dst: np.ndarray) -> None:
        """Copy the bytes into ``dst`` (1-D ``uint8``, ``nbytes`` long); returns when done."""
        torch.from_numpy(dst).copy_(self._u8)

    def host(self) -> np.ndarray:
        return self._u8.cpu().numpy()


class DeferredTensor:
    """A tensor computed straight into the memory the transport reserves for it.

    A CPU worker's result was computed into fresh memory (page faults and all) and then
    copied into the reply record: two writes of every byte where one would do.  Returned
    instead of a tensor (by an actor's method, see ``runtime.actor.serving``), a ``DeferredTensor``
    encodes as a tensor of ``shape`` and ``dtype`` -- the receiver decodes a plain tensor,
    in either payload format -- and ``fill(out)`` runs when the channel writes the reply:
    ``out`` is a contiguous CPU tensor of that shape and dtype over the ring record or pool
    slot itself (or, on the ZeroMQ-frames route, fresh memory), and ``fill`` must write every
    element of it, e.g. ``torch.mm(x, w.t(), out=out)``.  ``out`` is the transport's
    memory: ``fill`` must not keep it.  ``fill`` runs at most once (never for an empty
    tensor); if it raises, nothing is sent and the exception reaches the sender (an actor
    turns it into that call's error).  Satisfies ``framing.BufferWriter``.
    """

    __slots__ = ("dtype", "fill", "nbytes", "shape")

    def __init__(self, shape: Sequence[int], dtype: torch.dtype,
                 fill: Callable[[torch.Tensor], object]) -> None:
        if dtype not in TORCH_DTYPE_IDS:
            raise TypeError(f"a DeferredTensor's dtype must be one of the codec's tensor dtypes,"
                            f" got {dtype!r}")
        shape = tuple(shape)
        if len(shape) > MAX_NDIM or any(type(n) is not int or n < 0 for n in shape):
            raise ValueError(f"shape must be at most {MAX_NDIM} ints >= 0, got {shape!r}")
        if not callable(fill):
            raise TypeError(f"fill must be callable, got {type(fill).__name__}")
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.fill = fill
        self.nbytes = self.shape.numel() * dtype.itemsize

    def write_into(self, dst: np.ndarray) -> None:
        """Run ``fill`` over ``dst`` (1-D ``uint8``, ``nbytes`` long) seen as the tensor."""
        self.fill(torch.from_numpy(dst).view(self.dtype).view(self.shape))

    def host(self) -> np.ndarray:
        out = torch.empty(self.shape, dtype=self.dtype)
        if self.nbytes:  # an empty tensor has nothing to compute
            self.fill(out)
        return out.reshape(-1).view(torch.uint8).numpy()

    def __repr__(self) -> str:
        return f"DeferredTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


_new_encoded = tuple.__new__  # Encoded(...) without NamedTuple's Python-level __new__


class _NotPlain(Exception):
    """The value cannot be written in the plain format (internal)."""


_TOO_DEEP = object()  # _NotPlain's argument when the culprit is the nesting depth


# --------------------------------------------------------------------------- encode


def _tensor_bytes(t: torch.Tensor) -> tuple[int, tuple[int, ...], np.ndarray] | None:
    """Return (dtype id, shape, flat uint8 view) for ``t``, or None if unsupported."""
    entry = _TORCH_ENC.get(t.dtype)
    if entry is None or t.layout is not _TORCH_STRIDED or t.dim() > MAX_NDIM:
        return None
    code, alias = entry
    shape = t.shape
    if alias is None and t.is_cpu and not t.requires_grad and t.is_contiguous() \
            and type(t) is _TENSOR:
        # The hot path (~1.5 us): no torch op beyond .numpy(); conj/neg bits
        # make .numpy() raise and fall through to the general path.
        try:
            return code, shape, t.numpy().reshape(-1).view(np.uint8)
        except (RuntimeError, TypeError, ValueError):
            pass
    try:
        if t.requires_grad:
            t = t.detach()
        if not t.is_cpu:
            if t.device.type in DEVICE_WRITTEN:
                t = t.resolve_conj().resolve_neg().contiguous()
                return code, shape, DeviceBuffer(t)
            t = t.cpu()
        t = t.contiguous()
        try:
            # .numpy() and .view(dtype) refuse tensors with the conjugate or negative bit.
            arr = t.numpy() if alias is None else t.view(alias).numpy()
        except RuntimeError:
            t = t.resolve_conj().resolve_neg().contiguous()
            arr = t.numpy() if alias is None else t.view(alias).numpy()
        raw = np.frombuffer(arr, np.uint8)  # flat, zero-copy, holds arr (and t) alive
    except (RuntimeError, TypeError, NotImplementedError):  # meta, exotic subclasses: to pickle
        return None
    return code, shape, raw  # shape: a torch.Size


def _deferred_bytes(d: DeferredTensor) -> tuple[int, torch.Size, DeferredTensor]:
    """Return (dtype id, shape, the buffer writer itself) for ``d``: no bytes exist yet."""
    return TORCH_DTYPE_IDS[d.dtype], d.shape, d


def _array_bytes(a: np.ndarray) -> tuple[int, tuple[int, ...], np.ndarray] | None:
    """Return (dtype code, shape, flat uint8 view) for ``a``, or None if unsupported."""
    code = NUMPY_DTYPE_IDS.get(a.dtype)
    if code is None or a.ndim > MAX_NDIM:
        return None
    return code, a.shape, np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _descriptor(obj: object, bufs: list[np.ndarray], memo: dict[int, tuple]) -> bytes:
    """Plain-format descriptor of a tensor or array; adds its buffer once."""
    hit = memo.get(id(obj))
    if hit is not None:
        return hit[1]
    if isinstance(obj, DeferredTensor):
        is_tensor = True
        parts = _deferred_bytes(obj)
    else:
        is_tensor = isinstance(obj, _TENSOR)
        parts = _tensor_bytes(obj) if is_tensor else _array_bytes(obj)  # type: ignore[arg-type]
    if parts is None:
        raise _NotPlain(obj)
    code, shape, raw = parts
    desc = _DESC.pack(_T_TENSOR if is_tensor else _T_ARRAY, len(bufs), code, len(shape))
    desc += _DIMS[len(shape)].pack(*shape)
    bufs.append(raw)
    memo[id(obj)] = (obj, desc)  # holding obj keeps its id unique while encoding
    return desc


def _enc(obj: object, out: bytearray, bufs: list[np.ndarray],
         max_depth: int = MAX_DEPTH) -> None:
    """Append ``obj`` in the plain format to ``out``; raise _NotPlain if it cannot be.

    ``_NotPlain``'s argument is the culprit, or ``_TOO_DEEP``.

    Iterative, not recursive: ``stack`` holds the iterators of the enclosing
    containers, so its length is the depth of the value being written.
    """
    memo: dict[int, tuple] = {}
    stack: list = []
    it = iter((obj,))
    while True:
        for x in it:
            t = type(x)
            if t is str:
                b = x.encode("utf-8", "surrogatepass")
                out += _TAG_Q.pack(_T_STR, len(b))
                out += b
            elif t is int:
                if _I64_MIN <= x <= _I64_MAX:
                    out += _TAG_q.pack(_T_INT, x)
                else:
                    n = x.bit_length() // 8 + 1
                    out += _TAG_Q.pack(_T_BIGINT, n)
                    out += x.to_bytes(n, "little", signed=True)
            elif t is tuple or t is list:
                if len(stack) >= max_depth:
                    raise _NotPlain(_TOO_DEEP)
                out += _TAG_Q.pack(_T_TUPLE if t is tuple else _T_LIST, len(x))
                if x:
                    stack.append(it)
                    it = iter(x)
                    break
            elif t is dict:
                if len(stack) >= max_depth:
                    raise _NotPlain(_TOO_DEEP)
                out += _TAG_Q.pack(_T_DICT, len(x))
                if x:
                    stack.append(it)
                    it = _chain(x.items())
                    break
            elif t is _TENSOR or t is _NDARRAY or t is DeferredTensor:
                out += _descriptor(x, bufs, memo)
            elif x is None:
                out.append(_T_NONE)
            elif t is bool:
                out.append(_T_TRUE if x else _T_FALSE)
            elif t is float:
                out += _TAG_d.pack(_T_FLOAT, x)
            elif t is bytes or t is bytearray:
                out += _TAG_Q.pack(_T_BYTES, len(x))
                out += x
            elif t is complex:
                out += _TAG_dd.pack(_T_COMPLEX, x.real, x.imag)
            elif t in _NUMPY_SCALARS:
                out += _TAG_B.pack(_T_NPSCALAR, _NUMPY_SCALARS[t][0])
                out += x.tobytes()
            elif isinstance(x, (_TENSOR, DeferredTensor)):  # subclasses (nn.Parameter, ...)
                out += _descriptor(x, bufs, memo)
            else:
                raise _NotPlain(x)
        else:  # this container is done: resume the enclosing one
            if not stack:
                return
            it = stack.pop()


class _RebuildsExceptions(cloudpickle.Pickler):
    """cloudpickle that rebuilds exceptions without calling their ``__init__``.

    Python's own reduction of an exception rebuilds it as ``cls(*exc.args)``, which
    fails for an ``__init__`` that takes other arguments than it passes up: an exception
    raised would reach the caller as a plain ``RemoteError`` instead of its type, and one
    passed as an argument or returned as a value made the receiver's decode fail with a
    ``TypeError`` (see :func:`runtime.errors.exception_reduction`).  Exceptions nested in
    one (its ``args``, its ``__dict__``, an ``ExceptionGroup``) go the same way.  Pickle
    asks ``reducer_override`` only about objects that are not of its built-in types, so
    tuples, strings, numbers and tensors (out of band) never pay for it.
    """

    def reducer_override(self, obj: object) -> object:
        # A reducer registered for the class (copyreg.pickle, a library stripping what
        # cannot travel) comes first, as it does for plain pickle.
        if isinstance(obj, BaseException) and type(obj) not in self.dispatch_table:
            rv = exception_reduction(obj)
            if rv is not None:
                return rv
        return super().reducer_override(obj)


class _Pickler(_RebuildsExceptions):
    """cloudpickle with tensors and arrays sent out of band (and exceptions rebuilt)."""

    def __init__(self, file: io.BytesIO, bufs: list[np.ndarray]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.bufs = bufs
        self.memo_ids: dict[int, tuple] = {}
        self.last: object = None  # the last object seen: names the culprit of a failure

    def persistent_id(self, obj: object) -> object:
        """Return the out-of-band descriptor of a tensor or array, else None."""
        self.last = obj
        if isinstance(obj, _TENSOR):
            kind, parts = "T", _tensor_bytes(obj)
        elif isinstance(obj, DeferredTensor):
            kind, parts = "T", _deferred_bytes(obj)
        elif type(obj) is _NDARRAY:
            kind, parts = "N", _array_bytes(obj)  # type: ignore[arg-type]
        else:
            return None
        if parts is None:
            return None
        hit = self.memo_ids.get(id(obj))
        if hit is not None:
            return hit[1]
        code, shape, raw = parts
        pid = (kind, len(self.bufs), code, tuple(shape))
        self.bufs.append(raw)
        self.memo_ids[id(obj)] = (obj, pid)
        return pid


def _pickled(obj: object, bufs: list[np.ndarray]) -> bytes:
    """Return ``obj`` pickled, its tensors and arrays appended to ``bufs``."""
    f = io.BytesIO()
    p = _Pickler(f, bufs)
    try:
        p.dump(obj)
    except RecursionError as exc:
        raise TransportError("cannot encode: nesting deeper than pickle can follow") from exc
    except Exception as exc:
        if "recursion" in str(exc):  # cloudpickle rewraps RecursionError
            raise TransportError("cannot encode: nesting deeper than pickle can follow") from exc
        culprit = type(p.last if p.last is not None else obj)
        raise TypeError(
            f"cannot encode a value of type {culprit.__module__}.{culprit.__qualname__}"
            f" (in a message of type {type(obj).__qualname__}): {type(exc).__name__}: {exc}"
        ) from exc
    return f.getvalue()


def encode(obj: object, *, plain_only: bool = False, envelope: int = 0) -> Encoded:
    """Encode ``obj`` into a header and out-of-band buffers.

    The plain format is used when ``obj`` holds only plain values (see the
    module docstring) nested at most :data:`MAX_DEPTH` containers deep, the
    pickle format otherwise.  Raises ``TypeError`` naming the offending type
    when ``obj`` cannot be pickled either, and ``TransportError`` when it
    nests too deep for pickle.

    ``envelope``: how many containers of ``obj`` are the caller's own
    wrapping around the values (a call tuple, say); the depth limit applies
    to the values inside, so a message may nest ``MAX_DEPTH + envelope``.

    With ``plain_only`` nothing is pickled: a message the plain format cannot
    express raises ``TypeError`` naming the offending type, or ``ValueError``
    when a value nests too deep (what a safe-mode peer refuses).
    """
    out = bytearray()
    bufs: list[np.ndarray] = []
    try:
        _enc(obj, out, bufs, MAX_DEPTH + envelope)
        fmt = FORMAT_PLAIN
    except _NotPlain as exc:
        if plain_only:
            culprit = exc.args[0] if exc.args else obj
            if culprit is _TOO_DEEP:
                raise ValueError(f"a value nests lists, tuples or dicts more than {MAX_DEPTH} "
                                 f"deep, which a safe-mode peer refuses") from None
            t = type(culprit)
            raise TypeError(
                f"message holds a value of type {t.__module__}.{t.__qualname__}; a safe-mode "
                f"peer accepts only tensors, arrays, numbers, str, bytes, None, bool and "
                f"lists/tuples/dicts of these") from None
        bufs = []
        out = _pickled(obj, bufs)  # type: ignore[assignment]
        fmt = FORMAT_PICKLE
    header = _PREFIX.pack(MAGIC, VERSION, fmt) + out
    return _new_encoded(Encoded, (header, bufs, len(header) + sum([b.nbytes for b in bufs])))


# --------------------------------------------------------------------------- decode


def _as_uint8_array(i: int, b: object) -> np.ndarray:
    """Buffer ``i`` as a 1-D uint8 numpy array sharing its memory."""
    if type(b) is _NDARRAY:
        if b.dtype != np.uint8 or b.ndim != 1:
            raise ProtocolError(f"buffer {i} is not a 1-D uint8 array")
        return b
    if isinstance(b, _TENSOR) and b.dtype is _UINT8 and b.dim() == 1 and b.is_cpu:
        return b.numpy()
    raise ProtocolError(f"buffer {i} is not a 1-D uint8 numpy array or torch.uint8 tensor")


_TORCH_BOOL = torch.bool
_NUMPY_BOOL = _NUMPY_BY_CODE[NUMPY_DTYPE_IDS[np.dtype(bool)]]

# What decoding one message needs besides the header:
# (buffers, sizes from the header, memo: buffer index -> (descriptor, object)).
_Ctx = tuple[Sequence[torch.Tensor], tuple[int, ...], dict[int, tuple]]


def _materialize(is_tensor: bool, idx: int, code: int, shape: tuple[int, ...], ctx: _Ctx) -> object:
    """Return the tensor or array that buffer ``idx`` holds, after checking its descriptor."""
    buffers, sizes, memo = ctx
    if not 0 <= idx < len(sizes):
        raise ProtocolError(f"buffer index {idx} out of range ({len(sizes)} buffers)")
    hit = memo.get(idx)
    if hit is not None:
        if hit[0] != (is_tensor, code, shape):
            raise ProtocolError(f"buffer {idx} described twice with different dtype or shape")
        return hit[1]
    if is_tensor:
        entry = _TORCH_BY_ID.get(code)
        if entry is None:
            raise ProtocolError(f"unknown torch dtype id {code}")
        dtype, itemsize = entry
    else:
        ndt = _NUMPY_BY_CODE.get(code)
        if ndt is None:
            raise ProtocolError(f"unknown numpy dtype id {code}")
        dtype, itemsize = ndt, ndt.itemsize
    if len(shape) > MAX_NDIM:
        raise ProtocolError(f"ndim {len(shape)} exceeds {MAX_NDIM}")
    count = 1
    nonzero = 1
    for d in shape:
        if d < 0:
            raise ProtocolError(f"negative dimension {d} in shape {shape}")
        count *= d
        if d:
            nonzero *= d
    if nonzero * itemsize > _I64_MAX:
        raise ProtocolError(f"shape {shape} overflows")
    size = sizes[idx]
    if count * itemsize != size:
        raise ProtocolError(
            f"shape {shape} of {dtype} needs {count * itemsize} bytes but buffer {idx} holds {size}"
        )
    buf = buffers[idx]  # a 1-D uint8 numpy array
    if (dtype is _TORCH_BOOL or dtype is _NUMPY_BOOL) and size and int(buf.max()) > 1:
        raise ProtocolError(f"bool buffer {idx} holds bytes other than 0 and 1")
    try:
        if is_tensor:
            ndt = _TORCH_TO_NUMPY.get(dtype)
            typed = buf.view(ndt) if ndt is not None and size else None
            if not size:
                obj = torch.empty(shape, dtype=dtype)
            elif typed is not None and typed.flags.aligned:
                # ~1.2 us: numpy views, one torch call (a torch view costs ~2 us each)
                obj = torch.from_numpy(typed.reshape(shape))
            else:
                raw = torch.from_numpy(buf)
                try:
                    obj = raw.view(dtype)
                except RuntimeError:  # storage offset misaligned for the dtype: copy
                    obj = raw.clone().view(dtype)
                obj = obj.view(shape)
        else:
            obj = buf.view(dtype).reshape(shape)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot view buffer {idx} as {dtype} {shape}: {exc}") from exc
    memo[idx] = ((is_tensor, code, shape), obj)
    return obj


def _truncated(what: str, pos: int, need: int, end: int) -> ProtocolError:
    return ProtocolError(
        f"truncated header: {what} at offset {pos} needs {need} bytes, {end - pos} left"
    )


_CONTAINER_NAMES = {_T_LIST: "list", _T_TUPLE: "tuple", _T_DICT: "dict"}
_LENGTH_TAGS = frozenset((_T_STR, _T_BYTES, _T_BIGINT))
_DESC_TAGS = frozenset((_T_TENSOR, _T_ARRAY))


def _key_cost(k: object) -> int:
    """What comparing key ``k`` with an equal-hash one may cost, in 64-bit words."""
    t = type(k)
    if t is int:
        return 1 + k.bit_length() // 64  # type: ignore[attr-defined]
    if t is tuple:
        return 1 + sum(_key_cost(e) for e in k)  # type: ignore[attr-defined]
    if t is str or t is bytes:
        return 1 + len(k) // 8  # type: ignore[arg-type]
    return 1


def _charge_keys(keys: list, budget: list[int]) -> None:
    """Charge an untrusted peer's dict ``keys`` to ``budget`` ([keys, words] left).

    Keys other than str and bytes hash without randomisation, so a peer can make any
    number collide, and every colliding pair is compared when the dict is built: their
    number and their size (a comparison walks a big int or a tuple whole) are both capped.
    """
    n = cost = 0
    for k in keys:
        t = type(k)
        if t is not str and t is not bytes:
            n += 1
            cost += _key_cost(k)
    if n:
        budget[0] -= n
        budget[1] -= cost
        if budget[0] < 0 or budget[1] < 0:
            raise ProtocolError(
                f"dict keys other than str and bytes past the budget of a message from an "
                f"untrusted peer ({SAFE_HASHED_KEYS} keys, {SAFE_KEY_WORDS} 64-bit words)")


def _dec(data: bytes, pos: int, end: int, ctx: _Ctx,
         envelope: int = 0, *, key_budget: list[int] | None = None,
         values: int | None = None) -> tuple[object, int]:
    """Read one plain-format value at ``pos``; return it and the offset after it.

    Iterative, not recursive: the open container is ``(items, want, kind)``
    (``items`` None at the top level) and ``stack`` holds the enclosing ones,
    so ``len(stack)`` is the number of open containers.  ``key_budget``: what the dict
    keys other than str and bytes may amount to (see :func:`_charge_keys`; None: any).
    ``values``: how many values (containers included) the message may hold (None: any).
    """
    stack: list[tuple] = []
    items: list | None = None
    want = 0
    kind = 0
    while True:
        if pos >= end:
            raise ProtocolError(f"truncated header: value expected at offset {pos}")
        tag = data[pos]
        pos += 1
        if values is not None:  # every value, containers included, starts with its tag
            values -= 1
            if values < 0:
                raise ProtocolError(f"more than {SAFE_MAX_VALUES} values in a message from an "
                                    f"untrusted peer")
        if tag == _T_INT:
            if end - pos < 8:
                raise _truncated("int", pos, 8, end)
            v = _unpack_i64(data, pos)[0]
            pos += 8
        elif tag in _LENGTH_TAGS:
            if end - pos < 8:
                raise _truncated("length", pos, 8, end)
            n = _unpack_u64(data, pos)[0]
            pos += 8
            if n > end - pos:
                raise ProtocolError(
                    f"declared length {n} at offset {pos - 8} beyond frame ({end - pos} bytes left)"
                )
            raw = data[pos : pos + n]
            if tag == _T_STR:
                try:
                    v = raw.decode("utf-8", "surrogatepass")
                except UnicodeDecodeError as exc:
                    raise ProtocolError(
                        f"invalid UTF-8 in str at offset {pos}: {exc.reason}"
                    ) from None
            elif tag == _T_BYTES:
                v = raw
            else:
                v = int.from_bytes(raw, "little", signed=True)
            pos += n
        elif tag in _CONTAINER_NAMES:
            if end - pos < 8:
                raise _truncated(f"{_CONTAINER_NAMES[tag]} length", pos, 8, end)
            n = _unpack_u64(data, pos)[0]
            pos += 8
            if tag == _T_DICT:
                n *= 2  # keys and values
            if n > end - pos:  # every item takes at least one byte
                raise ProtocolError(
                    f"declared length {n} of {_CONTAINER_NAMES[tag]} at offset {pos - 8}"
                    f" beyond frame ({end - pos} bytes left)"
                )
            if len(stack) >= MAX_DEPTH + envelope:
                raise ProtocolError(f"nesting deeper than {MAX_DEPTH} at offset {pos - 9}")
            if n:
                stack.append((items, want, kind))
                items, want, kind = [], n, tag
                continue
            v = [] if tag == _T_LIST else () if tag == _T_TUPLE else {}
        elif tag in _DESC_TAGS:
            if end - pos < 6:
                raise _truncated("descriptor", pos, 6, end)
            idx, code, ndim = _unpack_desc(data, pos)
            pos += 6
            if ndim > MAX_NDIM:
                raise ProtocolError(f"ndim {ndim} exceeds {MAX_NDIM}")
            if end - pos < 8 * ndim:
                raise _truncated("shape", pos, 8 * ndim, end)
            shape = _DIMS[ndim].unpack_from(data, pos)
            pos += 8 * ndim
            v = _materialize(tag == _T_TENSOR, idx, code, shape, ctx)
        elif tag == _T_NONE:
            v = None
        elif tag == _T_TRUE:
            v = True
        elif tag == _T_FALSE:
            v = False
        elif tag == _T_FLOAT:
            if end - pos < 8:
                raise _truncated("float", pos, 8, end)
            v = _unpack_d(data, pos)[0]
            pos += 8
        elif tag == _T_COMPLEX:
            if end - pos < 16:
                raise _truncated("complex", pos, 16, end)
            v = complex(*_unpack_dd(data, pos))
            pos += 16
        elif tag == _T_NPSCALAR:
            if end - pos < 1:
                raise _truncated("numpy scalar", pos, 1, end)
            code = data[pos]
            ndt = _NUMPY_BY_CODE.get(code)
            if ndt is None:
                raise ProtocolError(f"unknown numpy dtype id {code}")
            pos += 1
            if end - pos < ndt.itemsize:
                raise _truncated("numpy scalar", pos, ndt.itemsize, end)
            if ndt.kind == "b" and data[pos] > 1:
                raise ProtocolError(f"numpy bool scalar at offset {pos} is {data[pos]}")
            v = np.frombuffer(data, ndt, 1, pos)[0]
            pos += ndt.itemsize
        else:
            raise ProtocolError(f"unknown tag {tag:#04x} at offset {pos - 1}")
        # v is complete: add it to the open container, closing those it completes.
        while True:
            if items is None:
                return v, pos
            items.append(v)
            if len(items) < want:
                break
            if kind == _T_LIST:
                v = items
            elif kind == _T_TUPLE:
                v = tuple(items)
            else:
                keys = items[::2]
                if key_budget is not None:
                    _charge_keys(keys, key_budget)
                try:
                    v = dict(zip(keys, items[1::2], strict=True))
                except TypeError:
                    raise ProtocolError("unhashable dict key") from None
            items, want, kind = stack.pop()


class _Unpickler(pickle.Unpickler):
    """Unpickler resolving out-of-band descriptors against the received buffers."""

    def __init__(self, file: io.BytesIO, ctx: _Ctx) -> None:
        super().__init__(file)
        self.ctx = ctx

    def persistent_load(self, pid: object) -> object:
        """Return the tensor or array a descriptor names, after checking it."""
        if not (
            type(pid) is tuple
            and len(pid) == 4
            and pid[0] in ("T", "N")
            and type(pid[1]) is int
            and type(pid[2]) is int
            and type(pid[3]) is tuple
            and all(type(d) is int for d in pid[3])
        ):
            raise ProtocolError(f"malformed out-of-band descriptor {pid!r:.100}")
        return _materialize(pid[0] == "T", pid[1], pid[2], pid[3], self.ctx)


def decode(
    header: bytes | bytearray | memoryview,
    buffers: Sequence[np.ndarray | torch.Tensor],
    *,
    safe: bool,
    envelope: int = 0,
) -> object:
    """Decode a message from its header and its buffers.

    ``buffers`` are 1-D ``uint8`` numpy arrays (or ``torch.uint8`` CPU
    tensors) the caller owns, exactly as many as :func:`encode` produced, in
    order; tensors and arrays in the result are views of them.  With
    ``safe=True`` only the plain format is accepted and nothing is ever
    unpickled.  Plain values may nest :data:`MAX_DEPTH` containers deep
    inside ``envelope`` containers of the caller's (see :func:`encode`).  Any
    malformed input raises :class:`~runtime.errors.ProtocolError` naming the
    defect.
    """
    data = header if type(header) is bytes else bytes(header)
    end = len(data)
    if end < _PREFIX_LEN:
        raise ProtocolError(f"truncated header: {end} bytes, the fixed part needs {_PREFIX_LEN}")
    magic, version, fmt = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported codec version {version} (this side speaks {VERSION})")
    if fmt != FORMAT_PLAIN:
        if fmt != FORMAT_PICKLE:
            raise ProtocolError(f"unknown payload format {fmt}")
        if safe:
            raise ProtocolError(
                "pickled payload refused in safe mode: the peer sent values outside"
                " the plain format"
            )
    pos = _PREFIX_LEN
    n = len(buffers)
    if n:
        buffers = [_as_uint8_array(i, b) for i, b in enumerate(buffers)]
    sizes = [b.size for b in buffers]
    memo: dict[int, tuple] = {}
    ctx = (buffers, sizes, memo)
    if fmt == FORMAT_PLAIN:
        try:
            obj, pos = _dec(data, pos, end, ctx, envelope,
                            key_budget=[SAFE_HASHED_KEYS, SAFE_KEY_WORDS] if safe else None,
                            values=SAFE_MAX_VALUES if safe else None)
        except ProtocolError:
            raise
        except Exception as exc:  # a safety net: every defect should be named above
            raise ProtocolError(f"malformed header: {type(exc).__name__}: {exc}") from exc
        if pos != end:
            raise ProtocolError(f"trailing bytes: {end - pos} after the payload")
    else:
        f = io.BytesIO(data)
        f.seek(pos)
        try:
            obj = _Unpickler(f, ctx).load()
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"corrupted pickle payload: {type(exc).__name__}: {exc}") from exc
        if f.tell() != end:
            raise ProtocolError(f"trailing bytes: {end - f.tell()} after the pickle payload")
    if len(memo) != n:
        unused = min(set(range(n)) - memo.keys())
        raise ProtocolError(f"buffer {unused} is not referenced by the payload")
    return obj


# --------------------------------------------------------------------- exceptions


def exception_bytes(exc: BaseException) -> bytes | None:
    """``exc`` pickled for a trusted peer, or None if it cannot be rebuilt there.

    The class travels by reference (by value if not importable, as cloudpickle does),
    with ``args`` and ``__dict__``; the peer rebuilds it without ``__init__`` (see
    :class:`_RebuildsExceptions`).  The round trip is tried here, so an exception whose
    pickling or unpickling fails (or raises ``SystemExit``) travels as text only.
    Never for an untrusted peer, nor loaded from one: loading unpickles.
    """
    try:
        f = io.BytesIO()
        _RebuildsExceptions(f, protocol=pickle.HIGHEST_PROTOCOL).dump(exc)
        data = f.getvalue()
        cloudpickle.loads(data)
    except BaseException:  # noqa: BLE001 - a hostile exception must not end the process
        return None
    return data


def trusted_exception(data: bytes) -> BaseException | None:
    """Rebuild what :func:`exception_bytes` made (None if it is no exception).

    Only for bytes from a trusted peer: this unpickles.
    """
    try:
        exc = cloudpickle.loads(data)
    except Exception:  # noqa: BLE001 - an unloadable exception still arrives as text
        return None
    return exc if isinstance(exc, BaseException) else None
