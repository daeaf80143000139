"""Run the test suite as parallel pytest shards: what ``make test`` calls.

Why: the suite waits far more than it computes.  On the 2-core CI machine a serial run
took ~8.6 minutes of wall time for ~3 minutes of CPU (``time make test``): nearly every
actor test pays ~0.8 s for its session's zygote to import torch, and the fault tests
wait out timeouts on purpose.  Two pytest processes over disjoint files overlap those
waits; each test still runs alone in its process, with the same fixtures (the
``no_leaks`` check already ignores sessions of unrelated processes, see
``tests/conftest.py``).

How: test files are dealt to ``TEST_JOBS`` shards (default: 2, at most the CPU count),
longest first, each to the shard with the least expected time so far, by the per-file
seconds in ``tests/shard_weights.json`` (a file not listed there counts
``DEFAULT_WEIGHT``; ``--record`` rewrites the table from a run).  Each shard is
``python -m pytest <its files> <args>`` with its own ``--basetemp`` and cache directory,
its output in a log: while the shards run, their progress lines are printed as they
come, prefixed by the shard's number; each shard's report (failures, summary) is
printed whole when it ends, never interleaved with another's.

Arguments are pytest's and go to every shard (with ``-x``, a shard's failure stops the
others).  When they name a test file or directory
the run is a single plain pytest (the user chose the tests); so is ``TEST_JOBS=1``.
Exit status: pytest's, merged (the worst shard's; 5, "no tests collected", only if no
shard ran any test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "tests" / "shard_weights.json"
DEFAULT_WEIGHT = 1.0  # seconds: a file the table does not know yet
NO_TESTS = 5  # pytest's exit status when nothing was collected
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROGRESS = re.compile(r"^[.sSxXfFeE]+\s*\[\s*\d+%\]$")
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)")
_ORDER = ("passed", "failed", "error", "skipped", "deselected", "xfailed", "xpassed", "warning")


class Shard(NamedTuple):
    """One pytest process's share of the suite."""

    files: list[str]
    expected_s: float


def suite_files(root: Path = ROOT) -> list[str]:
    """The suite's test files, relative to ``root``, in pytest's order."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py"))


def load_weights(path: Path = WEIGHTS) -> dict[str, float]:
    """Per-file seconds; an unreadable table means no weights (every file the default)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in raw.items() if isinstance(v, int | float)}


def deal(files: Sequence[str], weights: dict[str, float], jobs: int) -> list[Shard]:
    """Deal ``files`` to at most ``jobs`` shards, longest first, each to the least loaded.

    The greedy rule (longest processing time first) ends within 4/3 of the best split.
    Shards keep their files in the suite's order; empty shards are dropped.
    """
    jobs = max(1, jobs)
    load = [0.0] * jobs
    shares: list[list[str]] = [[] for _ in range(jobs)]
    for f in sorted(files, key=lambda f: (-weights.get(f, DEFAULT_WEIGHT), f)):
        i = min(range(jobs), key=lambda j: (load[j], j))
        shares[i].append(f)
        load[i] += weights.get(f, DEFAULT_WEIGHT)
    order = {f: n for n, f in enumerate(files)}
    return [Shard(sorted(s, key=order.__getitem__), load[i])
            for i, s in enumerate(shares) if s]


def names_tests(args: Sequence[str], root: Path = ROOT) -> bool:
    """True if ``args`` name a test file or directory (then the user chose the tests)."""
    for a in args:
        if a.startswith("-"):
            continue
        path = Path(a.split("::", 1)[0])
        if (path if path.is_absolute() else root / path).exists():
            return True
    return False


def merge_status(codes: Sequence[int]) -> int:
    """One exit status for the run: the worst shard's; 5 only if every shard had none."""
    real = [c if c >= 0 else 128 - c for c in codes if c != NO_TESTS]  # -N: killed by N
    if not real:
        return NO_TESTS if codes else 0
    return max(real)


def is_progress(line: str) -> bool:
    """A pytest ``-q`` progress line: outcome letters, then ``[ NN%]``."""
    return bool(_PROGRESS.match(_ANSI.sub("", line).strip()))


def outcome_counts(report: Sequence[str]) -> dict[str, int]:
    """The counts in pytest's final line ("3 passed, 1 skipped in 2.0s"), if it printed one."""
    for line in reversed(report):
        plain = _ANSI.sub("", line)
        if " in " in plain and _COUNT.search(plain):
            return {kind.rstrip("s") if kind.startswith(("error", "warning")) else kind: int(n)
                    for n, kind in _COUNT.findall(plain)}
    return {}


def default_jobs() -> int:
    env = os.environ.get("TEST_JOBS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            sys.exit(f"TEST_JOBS must be a whole number, got {env!r}")
    return max(1, min(2, os.cpu_count() or 1))


class _Running:
    """A shard's process and what of its log has been read."""

    def __init__(self, number: int, shard: Shard, args: Sequence[str], tmp: Path,
                 record: bool) -> None:
        self.number = number
        self.shard = shard
        self.log_path = tmp / f"shard{number}.log"
        self.junit = tmp / f"shard{number}.xml" if record else None
        cmd = [sys.executable, "-m", "pytest", *shard.files, *args,
               f"--basetemp={tmp / f'basetemp{number}'}",
               "-o", f"cache_dir={ROOT / '.pytest_cache' / f'shard{number}'}"]
        if self.junit is not None:
            cmd += [f"--junitxml={self.junit}", "-o", "junit_family=xunit1"]
        if sys.stdout.isatty():
            cmd.append("--color=yes")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in finish()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        self._reader = open(self.log_path, "rb")  # noqa: SIM115 -- closed in finish()
        self._partial = b""
        self.report: list[str] = []
        self.started = time.monotonic()
        self.wall_s = 0.0

    def poll_lines(self) -> list[str]:
        """Complete lines written since the last look; non-progress ones kept for the end."""
        data = self._partial + self._reader.read()
        *lines, self._partial = data.split(b"\n")
        progress = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            (progress if is_progress(line) else self.report).append(line)
        return progress

    def finish(self) -> None:
        self.wall_s = time.monotonic() - self.started
        self.poll_lines()
        if self._partial:
            self.report.append(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        self._reader.close()
        self.log.close()


class _Stop:
    """Ctrl-C or SIGTERM while shards run: let them stop on their own, then make them.

    A terminal's Ctrl-C reaches the shards too (one process group), and pytest then
    stops and prints its report, which is worth waiting for.  A signal sent to this
    process alone is passed on after a second; shards still running 30 s later are
    killed.
    """

    FORWARD_AFTER_S = 1.0
    KILL_AFTER_S = 30.0

    def __init__(self) -> None:
        self.since: float | None = None
        self.signum = signal.SIGINT
        self._forwarded = False

    def note(self, signum: int, _frame: object) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.signum = signum

    def act(self, pending: Sequence[_Running]) -> None:
        if self.since is None:
            return
        waited = time.monotonic() - self.since
        for r in pending:
            if r.proc.poll() is not None:
                continue
            if waited >= self.KILL_AFTER_S:
                r.proc.kill()
            elif waited >= self.FORWARD_AFTER_S and not self._forwarded:
                r.proc.send_signal(self.signum)
        if waited >= self.FORWARD_AFTER_S:
            self._forwarded = True


def _trimmed(lines: list[str]) -> list[str]:
    """``lines`` without the blank lines at either end."""
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(args: Sequence[str], jobs: int, *, record: bool = False) -> int:
    files = suite_files()
    weights = load_weights()
    shards = deal(files, weights, jobs)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="pytest-shards-"))
    _print(f"{len(files)} test files in {len(shards)} shards "
           f"(TEST_JOBS={jobs}; expected " +
           ", ".join(f"{s.expected_s:.0f} s" for s in shards) + ")")
    running = [_Running(n + 1, s, args, tmp, record) for n, s in enumerate(shards)]
    pending = list(running)
    stop = _Stop()
    # -x: a failing shard stops the others (SIGINT: they print their reports); their
    # "interrupted" is then ours, not a status of theirs.
    exit_first = any(a in ("-x", "--exitfirst") or a.startswith("--maxfail") for a in args)
    cut: set[int] = set()
    old = {sig: signal.signal(sig, stop.note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending:
            time.sleep(0.2)
            stop.act(pending)
            for r in list(pending):
                for line in r.poll_lines():
                    _print(f"[{r.number}] {line}")
                if r.proc.poll() is not None:
                    r.finish()
                    pending.remove(r)
                    _print(f"---- shard {r.number}/{len(running)}: "
                           f"{_plural(len(r.shard.files), 'file')}, "
                           f"exit {r.proc.returncode}, {r.wall_s:.0f} s ----")
                    _print("\n".join(_trimmed(r.report)))
                    if exit_first and r.proc.returncode == 1:
                        for other in pending:
                            if other.number not in cut and other.proc.poll() is None:
                                cut.add(other.number)
                                other.proc.send_signal(signal.SIGINT)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for r in pending:  # only after an error of our own: leave no shard behind
            r.proc.kill()
            r.proc.wait()
            r.finish()
    status = merge_status([r.proc.returncode for r in running
                           if not (r.number in cut and r.proc.returncode == 2)])
    totals: dict[str, int] = {}
    for r in running:
        for kind, n in outcome_counts(r.report).items():
            totals[kind] = totals.get(kind, 0) + n
    counts = ", ".join(_plural(totals[k], k) if k in ("error", "warning") else f"{totals[k]} {k}"
                       for k in _ORDER if k in totals)
    _print(f"all shards: {counts or 'no counts'} in {time.monotonic() - t0:.0f} s ("
           + "; ".join(f"shard {r.number}: {r.wall_s:.0f} s, exit {r.proc.returncode}"
                       for r in running) + f") -> exit {status}")
    if record and status == 0 and stop.since is None:
        write_weights([r.junit for r in running if r.junit is not None])
    if status in (0, NO_TESTS):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        _print(f"logs and temporary files of the shards: {tmp}")
    return status


def write_weights(junit_files: Sequence[Path], path: Path = WEIGHTS) -> None:
    """Sum a run's per-test seconds (setup, call and teardown) by file into ``path``."""
    totals: dict[str, float] = {}
    for j in junit_files:
        for case in ET.parse(j).iter("testcase"):
            f = case.get("file")
            if f:
                totals[f] = totals.get(f, 0.0) + float(case.get("time") or 0.0)
    path.write_text(json.dumps({f: max(0.1, round(s, 1)) for f, s in sorted(totals.items())},
                               indent=1) + "\n")
    _print(f"wrote {path.relative_to(ROOT)}: {len(totals)} files, {sum(totals.values()):.0f} s")


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    record = "--record" in args
    if record:
        args.remove("--record")
    jobs = default_jobs()
    if record and names_tests(args):
        sys.exit("--record times the whole suite: name no test files")
    if (jobs == 1 or names_tests(args)) and not record:
        return subprocess.call([sys.executable, "-m", "pytest", *args], cwd=ROOT)
    return run(args, jobs, record=record)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
