"""The constructor memfd (``spec.py``): one framing record, sealed, mapped copy-on-write."""

from __future__ import annotations

import os

import pytest
import torch

from runtime.errors import ProtocolError
from runtime.spec import read_spec, write_spec
from runtime.transport import framing


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("t")
    os.write(fd, data)
    return fd


def test_a_spec_round_trips_and_its_tensors_are_private_copies_on_write():
    t = torch.arange(1000.0)
    fd = write_spec((dict, (), {"t": t, "n": 3}))
    try:
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)  # sealed: no restart can read anything else
        _, _, kw = read_spec(fd)
        assert kw["n"] == 3 and torch.equal(kw["t"], t)
        kw["t"][0] = -1.0  # copy-on-write: the memfd keeps what the driver wrote
        assert torch.equal(read_spec(fd)[2]["t"], t)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("data", "words"), [
    (b"RTSPEC0", "truncated"),
    (b"XXXXXXXX" + framing.head_bytes(framing.KIND_INLINE, 0, b"RTC\x02\x00N", []),
     "bad magic"),
    (b"RTSPEC02" + framing.head_bytes(framing.KIND_POOL, 0, b"RTC\x02\x00N", []), "kind 3"),
    (b"RTSPEC02" + framing.head_bytes(framing.KIND_INLINE, 0, b"RTC\x02\x00N", [1 << 20]),
     "overruns"),
])
def test_a_malformed_spec_is_a_protocol_error(data, words):
    fd = _memfd(data)
    try:
        with pytest.raises(ProtocolError, match=words):
            read_spec(fd)
    finally:
        os.close(fd)
