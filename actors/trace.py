"""A timeline of one prefill, as a Chrome trace (JSON ``traceEvents``; opens in Perfetto).

The TEE driver records its own spans while a traced prefill runs (:class:`Recorder`); the GPU
worker records every call it serves (``GPUWorker.trace_events``).  Both use the host's
``CLOCK_MONOTONIC`` (``time.monotonic_ns()``), which every process of one host shares, so the
two processes' spans line up without any clock exchange.  :func:`chrome_trace` merges them:

=================  ====================================================================
track              spans
=================  ====================================================================
TEE driver         ``prefill``: the whole call
  TEE compute      one span per block of TEE work, named by op (``rms_norm``, ``rope``,
                   ``attention``, ``qkv`` = the TEE's side of an offload: casts, checks)
  calls            ``send <op>``: the driver's thread encoding and copying a call out;
                   ``wait <op>``: blocked until the result is there — what still waits
  offloads         one async span per offloaded call, from its send to its reply's
                   arrival (stacked where several are in flight: the overlap)
GPU worker         ``<op>``: the worker's own compute per call (copies to and from the
  worker compute   device included, transport not); calls of other drivers are marked
=================  ====================================================================

Every span carries ``layer`` and ``chunk`` where it has one.  Times are microseconds from the
prefill's start.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["Recorder", "chrome_trace", "split_tag"]

# Thread ids of the tracks (Perfetto sorts tracks of a process by tid).
TID_PREFILL, TID_TEE, TID_CALLS, TID_WORKER = 0, 1, 2, 10


def split_tag(tag: str) -> tuple[str, str]:
    """``"qkv@1234.0"`` → ``("qkv", "1234.0")``: the op and the driver that called."""
    op, _, caller = tag.partition("@")
    return op, caller


class Recorder:
    """The TEE driver's spans of one prefill, on ``time.monotonic_ns()``.

    ``spans``: ``(tid, name, start_ns, end_ns, args)``; ``flights``: ``(op, start_ns,
    end_ns, args)`` of each offloaded call, from its send to its reply's arrival.
    """

    __slots__ = ("flights", "spans", "start_ns")

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.spans: list[tuple[int, str, int, int, dict[str, Any]]] = []
        self.flights: list[tuple[str, int, int, dict[str, Any]]] = []

    def span(self, tid: int, name: str, start_ns: int, end_ns: int,
             args: dict[str, Any]) -> None:
        self.spans.append((tid, name, start_ns, end_ns, args))

    def flight(self, op: str, start_ns: int, end_ns: int, args: dict[str, Any]) -> None:
        self.flights.append((op, start_ns, end_ns, args))


def worker_spans(got: Any) -> tuple[int, list[tuple[str, int, int, int]]] | None:
    """``(pid, spans)`` from a ``trace_events`` reply, or None when it is malformed.

    The reply is the worker's word (an untrusted one's too): only plain ints and short
    strings are kept, so the trace can neither fail to build nor fail to be written.
    """
    if not isinstance(got, dict):
        return None
    pid, events = got.get("pid", 0), got.get("events", [])
    if type(pid) is not int or not 0 <= pid < 1 << 31 or type(events) is not list:
        return None
    spans = []
    for ev in events:
        if type(ev) not in (list, tuple) or len(ev) != 4:
            return None
        tag, s, e, rows = ev
        if not (type(tag) is str and len(tag) <= 200 and all(type(v) is int and 0 <= v < 1 << 63
                                                             for v in (s, e, rows))):
            return None
        spans.append((tag, s, e, rows))
    return pid, spans


def chrome_trace(rec: Recorder, end_ns: int, worker: dict[str, Any] | None, caller: str,
                 meta: dict[str, Any]) -> dict[str, Any]:
    """The Chrome trace of one prefill: the driver's spans, and the worker's from ``worker``.

    ``worker`` is what ``GPUWorker.trace_events`` returned (``None``, or a malformed reply
    -- see :func:`worker_spans` --: no worker track); its spans outside the prefill are left
    out, and those of other drivers than ``caller``
    are kept, marked (they share the worker).  ``meta`` goes to ``otherData``.
    """
    pid = os.getpid()
    t0 = rec.start_ns

    def us(ns: int) -> float:
        return round((ns - t0) / 1e3, 3)

    events: list[dict[str, Any]] = [
        _meta("process_name", pid, None, f"TEE driver (pid {pid})"),
        _meta("process_sort_index", pid, None, 0),
        _meta("thread_name", pid, TID_PREFILL, "prefill"),
        _meta("thread_name", pid, TID_TEE, "TEE compute"),
        _meta("thread_name", pid, TID_CALLS, "calls: send / wait"),
        {"ph": "X", "name": "prefill", "cat": "prefill", "pid": pid, "tid": TID_PREFILL,
         "ts": 0.0, "dur": us(end_ns), "args": dict(meta)},
    ]
    for tid, name, s, e, args in rec.spans:
        events.append({"ph": "X", "name": name, "cat": "tee" if tid == TID_TEE else "call",
                       "pid": pid, "tid": tid, "ts": us(s), "dur": round((e - s) / 1e3, 3),
                       "args": args})
    for n, (op, s, e, args) in enumerate(rec.flights):
        common = {"name": op, "cat": "offload", "id": n, "pid": pid, "tid": TID_CALLS}
        events.append({**common, "ph": "b", "ts": us(s), "args": args})
        events.append({**common, "ph": "e", "ts": us(e)})
    parsed = worker_spans(worker) if worker else None
    if parsed is not None:
        wpid, spans = parsed
        tid = TID_WORKER
        if wpid != pid:
            events += [_meta("process_name", wpid, None, f"GPU worker (pid {wpid})"),
                       _meta("process_sort_index", wpid, None, 1)]
        events.append(_meta("thread_name", wpid, tid, "worker compute"))
        for tag, s, e, rows in spans:
            if e < t0 or s > end_ns:
                continue
            op, who = split_tag(tag)
            args: dict[str, Any] = {"rows": rows}
            if who != caller:
                args["caller"] = who or "unknown"
                op = f"{op} (other caller)"
            events.append({"ph": "X", "name": op, "cat": "worker", "pid": wpid, "tid": tid,
                           "ts": us(s), "dur": round((e - s) / 1e3, 3), "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"clock": "CLOCK_MONOTONIC", "origin_ns": t0, **meta}}


def _meta(name: str, pid: int, tid: int | None, value: Any) -> dict[str, Any]:
    key = "sort_index" if name.endswith("sort_index") else "name"
    ev: dict[str, Any] = {"ph": "M", "name": name, "pid": pid, "args": {key: value}}
    if tid is not None:
        ev["tid"] = tid
    return ev
