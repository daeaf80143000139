"""Session owner records and gc (runtime.session)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile

import pytest

from runtime.session import collect, process_identity


@pytest.fixture
def fake_session(own_tmp):
    """A session whose owners are recorded as this very process, with a start time
    of the caller's choosing, and one segment (in ``own_tmp``: a stale one elsewhere is
    any other test process's to collect)."""
    sid = secrets.token_hex(6)
    private = os.path.join(tempfile.gettempdir(), f"rt_{sid}")
    os.mkdir(private, 0o700)
    segment = os.path.join(own_tmp, f"rt_{sid}_{os.getpid()}_c0")
    open(segment, "wb").close()

    def record(start):
        for role in ("driver", "supervisor"):
            with open(os.path.join(private, f"{role}.json"), "w") as f:
                json.dump({"pid": os.getpid(), "start": start}, f)
        return sid, private, segment

    yield record
    shutil.rmtree(private, ignore_errors=True)
    if os.path.exists(segment):
        os.unlink(segment)


def test_gc_keeps_a_session_whose_owners_live(fake_session):
    sid, _, segment = fake_session(process_identity(os.getpid()))
    found = collect([os.path.dirname(segment)], dry_run=True)
    assert not [p for p, _ in found if sid in p]


def test_gc_takes_a_recycled_pid_for_a_dead_owner(fake_session):
    """The recorded pid is alive, but it is another process now (its start time differs)."""
    _, private, segment = fake_session(process_identity(os.getpid()) - 3600.0)
    found = dict(collect([os.path.dirname(segment)], dry_run=True))
    assert found.get(segment) == "driver process gone"
    assert found.get(private) == "driver process gone"
    assert os.path.exists(segment)  # a dry run removes nothing
