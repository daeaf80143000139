"""Plain-text tables of the driver's accounting, for the examples and benchmarks."""

from __future__ import annotations

from typing import Any

from actors.tee_driver import OPS

__all__ = ["decode_split", "op_table", "time_split"]

MIB = 1024 * 1024


def op_table(stats: dict[str, Any], per: int = 1) -> str:
    """The per-op table of a prefill's (or of the decode steps') stats.

    ``per`` divides the counts and times (e.g. the number of decode steps: per token).
    ``wait ms``: the driver blocked on the op's calls (sending included); ``flight ms``: the
    calls' time from send to reply, summed (pipelined calls overlap: it can exceed the
    prefill; the total row is the union).
    """
    head = (f"{'op':<10} {'where':<6} {'calls':>7} {'MiB out':>9} {'MiB in':>9} {'shm':>6} "
            f"{'zmq':>5} {'zmq MiB%':>8} {'wait ms':>9} {'flight ms':>9} {'worker ms':>9} "
            f"{'tee ms':>8} {'check ms':>8}")
    lines = [head, "-" * len(head)]
    n = max(1, per)
    for op in OPS:
        r = stats["ops"][op]
        if not r["calls"] and not r["tee_s"]:
            continue
        shm, zmq = r["routes"]["shm"], r["routes"]["zmq"]
        routed = shm["bytes"] + zmq["bytes"]
        share = f"{100 * zmq['bytes'] / routed:.0f}%" if routed else "-"
        lines.append(
            f"{op:<10} {r['where']:<6} {r['calls'] / n:>7.4g} "
            f"{r['bytes_out'] / MIB / n:>9.3f} {r['bytes_in'] / MIB / n:>9.3f} "
            f"{shm['messages'] / n:>6.4g} {zmq['messages'] / n:>5.4g} {share:>8} "
            f"{1e3 * r['wait_s'] / n:>9.2f} {1e3 * r.get('in_flight_s', 0.0) / n:>9.2f} "
            f"{1e3 * r['worker_s'] / n:>9.2f} "
            f"{1e3 * r['tee_s'] / n:>8.2f} {1e3 * r.get('verify_s', 0.0) / n:>8.2f}")
    routes = stats["routes"] or {"shm": {"messages": 0, "bytes": 0},
                                 "zmq": {"messages": 0, "bytes": 0}}
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<10} {'':<6} {stats['calls'] / n:>7.4g} {stats['bytes_out'] / MIB / n:>9.3f} "
        f"{stats['bytes_in'] / MIB / n:>9.3f} {routes['shm']['messages'] / n:>6.4g} "
        f"{routes['zmq']['messages'] / n:>5.4g} {'':>8} {1e3 * stats['wait_s'] / n:>9.2f} "
        f"{1e3 * (stats.get('in_flight_s') or 0.0) / n:>9.2f} "
        f"{1e3 * (stats['worker_s'] or 0) / n:>9.2f} {1e3 * stats['tee_s'] / n:>8.2f} "
        f"{1e3 * (stats.get('verify') or {}).get('seconds', 0.0) / n:>8.2f}")
    return "\n".join(lines)


def time_split(stats: dict[str, Any], label: str = "prefill", per: int = 1,
               unit: str = "") -> str:
    """Where the driver's time went, then where the offloads' time went.

    ``label T ms = TEE compute + waiting for the worker + driver glue`` (the driver's own
    thread: these add up), then ``offloads in flight F ms = worker compute + transport, H ms
    of it hidden behind TEE compute``: with a pipelined prefill the worker computes and the
    channel carries while the TEE computes, so only the waiting is on the driver's clock.
    """
    n = max(1, per)
    total, tee, wait = stats["total_s"], stats["tee_s"], stats["wait_s"]
    other = max(0.0, total - tee - wait)

    def ms(s: float) -> str:
        return f"{1e3 * s / n:.1f} ms"

    def part(name: str, s: float) -> str:
        return f"{name} {ms(s)} ({100 * s / total if total else 0:.0f}%)"

    line = (f"{label} {ms(total)}{unit} = " + " + ".join([
        part("TEE compute", tee), part("waiting for the worker", wait),
        part("driver glue", other)]))
    in_flight = stats.get("in_flight_s")
    if in_flight is None:
        return line
    worker = stats["worker_s"]
    transport = stats["transport_s"]
    what = [f"worker compute {ms(worker)}"] if worker is not None else []
    if transport is not None:
        what.append(f"transport {ms(transport)}")
    return (line + f"; offloads in flight {ms(in_flight)}"
            + (f" = {' + '.join(what)}" if what else "")
            + f", {ms(stats.get('hidden_s') or 0.0)} of it hidden behind TEE compute")


def decode_split(gen: dict[str, Any]) -> str:
    """The decode steps' time split per token, from ``last_generate_stats()``."""
    decode = gen["decode"]
    if not decode or not gen["steps"]:
        return "decode: no decode step ran"
    text = time_split(decode, "decode", gen["steps"], "/token")
    lm = gen.get("lm_head_threads")
    if lm and lm.get("one_ms") is not None:
        text += (f"\nlm_head in the TEE on {lm['threads']} thread(s): measured "
                 f"{lm['one_ms']:.2f} ms on one, {lm['many_ms']:.2f} ms on "
                 f"{lm['offered']}")
    return text
