"""actors.trace: the Chrome trace of a prefill, and the union of in-flight intervals."""

from __future__ import annotations

import json
import os

import pytest

from actors.tee_driver import _union_s
from actors.trace import TID_CALLS, TID_TEE, Recorder, chrome_trace, split_tag


def test_union_of_intervals():
    assert _union_s([]) == 0.0
    assert _union_s([(0, 10)]) == pytest.approx(10e-9)
    # nested, overlapping
    assert _union_s([(5, 8), (0, 10), (20, 30), (25, 40)]) == pytest.approx(30e-9)
    assert _union_s([(0, 10), (10, 20)]) == pytest.approx(20e-9)  # touching


def test_split_tag():
    assert split_tag("qkv@12.0") == ("qkv", "12.0")
    assert split_tag("matmul") == ("matmul", "")


def test_chrome_trace():
    rec = Recorder(1_000_000)
    rec.span(TID_TEE, "rope", 1_001_000, 1_003_000, {"layer": 0, "chunk": 1})
    rec.span(TID_CALLS, "wait qkv", 1_003_000, 1_004_000, {})
    rec.flight("qkv", 1_000_500, 1_004_000, {"layer": 0, "chunk": 0})
    worker = {"pid": 4242, "events": [
        ["qkv@me", 1_001_000, 1_002_000, 16],      # ours
        ["down@other", 1_002_000, 1_002_500, 16],  # another driver's, in the window
        ["qkv@me", 10, 20, 16],                    # before the prefill: left out
    ]}
    trace = json.loads(json.dumps(chrome_trace(rec, 1_005_000, worker, "me", {"tokens": 32})))
    ev = trace["traceEvents"]
    x = {(e["pid"], e["name"]): e for e in ev if e["ph"] == "X"}
    assert x[(os.getpid(), "prefill")]["dur"] == 5.0  # microseconds from the start
    assert x[(os.getpid(), "rope")]["ts"] == 1.0
    assert (x[(4242, "qkv")]["ts"], x[(4242, "qkv")]["dur"]) == (1.0, 1.0)
    assert x[(4242, "down (other caller)")]["args"]["caller"] == "other"
    assert sum(e["ph"] == "X" and e["pid"] == 4242 for e in ev) == 2
    b, e = [v for v in ev if v["ph"] in "be"]
    assert (b["ph"], e["ph"], b["id"], b["ts"], e["ts"]) == ("b", "e", e["id"], 0.5, 4.0)
    assert trace["otherData"]["clock"] == "CLOCK_MONOTONIC"
    assert trace["otherData"]["tokens"] == 32
