"""Run the test suite as parallel pytest shards: what ``make test`` calls.

Why: the suite waits far more than it computes.  On the 2-core CI machine a serial run
took ~8.8 minutes of wall time for ~3 minutes of CPU (``time make test``): nearly every
actor test pays ~0.8 s for its session's zygote to import torch, and the fault tests
wait out timeouts on purpose.  Two pytest processes over disjoint files overlap those
waits; each test still runs alone in its process, with the same fixtures (the
``no_leaks`` check already ignores sessions of unrelated processes; tests that make a
session stale on purpose keep it out of other processes' gc with ``own_tmp``, see
``tests/conftest.py``).

How: test files are dealt to ``TEST_JOBS`` shards (default: 2, at most the CPU count),
longest first, each to the shard with the least expected time so far, by the per-file
seconds in ``tests/shard_weights.json`` (a file not listed there counts
``DEFAULT_WEIGHT``; ``--record`` rewrites the table from a run).  Each shard is
``python -m pytest -p tests.shard_plugin --shard-files=<list> <args>``: pytest's own
collection (``testpaths``, ``--ignore``, ``collect_ignore``, ``python_files``), of which
that plugin drops the other shards' files (a test module the runner did not deal goes to
shard 1).  Each shard has its own ``--basetemp`` and cache
directory and runs in a session of its own, its output in a log.  While the shards run,
their progress lines (those ending in ``[ NN%]``) are printed as they come, prefixed by
the shard's number; each shard's report (failures, summary) is printed whole when it
ends, never interleaved with another's.  Afterwards the shards' failures are merged into
pytest's own cache (each shard's cache is first given the earlier failures of its
files), so ``make test PYTEST_ARGS=--lf`` reruns exactly what is still failing.

Arguments are pytest's and go to every shard; with ``-x`` (``--maxfail=1``) a shard's
failure stops the others (and is killed 30 s later if it has not stopped).
``PYTEST_ADDOPTS`` is read too.  A single plain pytest replaces this process (``exec``)
when the arguments name test files, directories or modules (the user chose the tests), when
they ask for something one process must do (one ``--junitxml`` or ``--basetemp``, the
cache's ``--lf``/``--ff``/``--sw``, ``--pdb``, ``--co``, ``--help``), and for
``TEST_JOBS=1``.

Signals: the shards are in sessions of their own, so a terminal's Ctrl-C reaches this
process only; it passes each SIGINT or SIGTERM on to the shards as one SIGINT (pytest
then stops, tears down and prints its report, which is worth waiting for; a second one
cuts the teardown short, as at a terminal).  A third signal, or 30 s, kills their whole
sessions.  If this process dies, its shards get SIGINT (``PR_SET_PDEATHSIG``).  Shards
start with SIGINT's default action whatever this process inherited (a shell starts a
background job with SIGINT ignored, and an ignored signal stays ignored across exec).

Exit status: pytest's, merged (the worst shard's; 5, "no tests collected", only if no
shard ran any test).  A failed run keeps its shards' logs and temporary files, and says
where; kept directories older than a day are removed by the next run.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import re
import shlex
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
CACHE = ROOT / ".pytest_cache"  # pytest's default cache_dir (setup.cfg sets none)
DEFAULT_WEIGHT = 1.0  # seconds: a file the table does not know yet
INTERRUPTED = 2  # pytest's exit status after Ctrl-C
NO_TESTS = 5  # pytest's exit status when nothing was collected
KEPT_PREFIX = "pytest-shards-"
KEEP_S = 24 * 3600  # a failed run's directory is removed by the first run a day later
PR_SET_PDEATHSIG = 1

# pytest options that take a value, spelled as the next argument ("-k expr").
_VALUE_OPTIONS = frozenset({
    "--basetemp", "--capture", "--code-highlight", "--color", "--confcutdir",
    "--config-file", "--deselect", "--durations", "--durations-min", "--ignore",
    "--ignore-glob", "--import-mode", "--junit-prefix", "--junit-xml", "--junitxml",
    "--last-failed-no-failures", "--lfnf", "--log-cli-level", "--log-date-format",
    "--log-file", "--log-file-level", "--log-format", "--log-level", "--maxfail",
    "--override-ini", "--report-log", "--rootdir", "--show-capture", "--tb", "--timeout",
    "--timeout-method", "--timeout_method",
})  # fmt: skip
_SHORT_WITH_VALUE = "ckmopWr"  # -k expr, -m marks, -p plugin, -o ini, -c file, -W, -r chars
# Options only one pytest process can honour: one output file or directory, the cache's
# selections (per-shard caches would each see part of the history), interaction.
_PLAIN_OPTIONS = frozenset({
    "--basetemp", "--junitxml", "--junit-xml", "--report-log", "--lf", "--last-failed",
    "--ff", "--failed-first", "--nf", "--new-first", "--sw", "--stepwise", "--sw-skip",
    "--stepwise-skip", "--pdb", "--trace", "--pyargs", "--co", "--collect-only",
    "--fixtures", "--fixtures-per-test", "--markers", "--help", "--version", "--cache-show",
    "--setup-plan", "--setup-only",
})  # fmt: skip
_ANSI = re.compile(rb"\x1b\[[0-9;]*m")
_PROGRESS = re.compile(rb"\[\s*\d+%\]$")
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)")
_ORDER = ("passed", "failed", "error", "skipped", "deselected", "xfailed", "xpassed", "warning")


class Shard(NamedTuple):
    """One pytest process's share of the suite."""

    files: list[str]
    expected_s: float


class Args(NamedTuple):
    """What the runner must know of pytest's arguments."""

    names_tests: bool  # a test file, directory or node id: the user chose the tests
    plain: str | None  # an option one process must honour (its name), else None
    exit_first: bool  # -x, --exitfirst, --maxfail=1
    no_cache: bool  # -p no:cacheprovider


PYTHON_FILES = ("test_*.py", "*_test.py")  # pytest's default python_files (setup.cfg: same)


def suite_files(root: Path = ROOT) -> list[str]:
    """The suite's test modules under ``tests/``, relative to ``root``, in sorted order."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("*.py")
                  if any(fnmatch.fnmatch(p.name, pat) for pat in PYTHON_FILES))


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


def parse_args(args: Sequence[str], root: Path = ROOT) -> Args:
    """Read pytest's arguments as pytest would, as far as sharding cares."""
    names = exit_first = no_cache = False
    plain: str | None = None
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":  # the rest are paths
            names = names or any(_exists(b, root) for b in args[i:])
            break
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            if name in _VALUE_OPTIONS and not eq:
                if i >= len(args):  # pytest's usage error: let pytest say so
                    plain = plain or name
                value = args[i] if i < len(args) else ""
                i += 1
            if name in _PLAIN_OPTIONS and plain is None:
                plain = name
            exit_first |= name == "--exitfirst" or (name == "--maxfail"
                                                    and value.strip() == "1")
        elif a.startswith("-") and len(a) > 1:
            # A cluster of short options ("-qx", "-rfE"): letters up to one taking a value.
            for j, ch in enumerate(a[1:], 1):
                if ch in "hV" and plain is None:
                    plain = f"-{ch}"
                exit_first |= ch == "x"
                if ch in _SHORT_WITH_VALUE:
                    value = a[j + 1:]
                    if not value:
                        if i >= len(args):
                            plain = plain or f"-{ch}"
                        value = args[i] if i < len(args) else ""
                        i += 1
                    no_cache |= ch == "p" and value == "no:cacheprovider"
                    break
        else:
            names = names or _exists(a, root)
    return Args(names, plain, exit_first, no_cache)


def _exists(arg: str, root: Path) -> bool:
    if not arg:
        return False
    path = Path(arg.split("::", 1)[0])
    return (path if path.is_absolute() else root / path).exists()


def merge_status(codes: Sequence[int]) -> int:
    """One exit status for the run: the worst shard's; 5 only if every shard had none."""
    real = [c if c >= 0 else 128 - c for c in codes if c != NO_TESTS]  # -N: killed by N
    if not real:
        return NO_TESTS if codes else 0
    return max(real)


def is_progress(line: bytes) -> bool:
    """A pytest progress line: ``-q``'s outcome letters or ``-v``'s test, then ``[ NN%]``."""
    return bool(_PROGRESS.search(_ANSI.sub(b"", line).rstrip()))


def outcome_counts(report: Sequence[bytes]) -> dict[str, int]:
    """The counts in pytest's final line ("3 passed, 1 skipped in 2.0s"), if it printed one."""
    for raw in reversed(report):
        plain = _ANSI.sub(b"", raw).decode("utf-8", "replace")
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


def _die_with_parent(parent: int) -> None:
    """In the shard, before exec: SIGINT's default action, and SIGINT when the runner dies."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # not an ignore inherited from a shell
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: a killed runner leaves its shards to finish
    if os.getppid() != parent:  # the runner died before prctl
        os._exit(INTERRUPTED)


class _Running:
    """A shard's process and what of its log has been read."""

    def __init__(self, number: int, shard: Shard, dealt: Sequence[str], args: Sequence[str],
                 parsed: Args, tmp: Path, record: bool) -> None:
        self.number = number
        self.shard = shard
        self.log_path = tmp / f"shard{number}.log"
        self.junit = tmp / f"shard{number}.xml" if record else None
        share = tmp / f"shard{number}.files"
        share.write_text(json.dumps({"number": number, "files": shard.files,
                                     "dealt": dealt}))
        # The runner's options first: the user's, after them, win where both are given.
        ours = ["-p", "tests.shard_plugin", f"--shard-files={share}",
                f"--basetemp={tmp / f'basetemp{number}'}"]
        if not parsed.no_cache:
            ours += ["-o", f"cache_dir={self.cache_dir}"]
        if sys.stdout.isatty():
            ours.append("--color=yes")
        if self.junit is not None:
            ours += [f"--junitxml={self.junit}", "-o", "junit_family=xunit1"]
        cmd = [sys.executable, "-m", "pytest", *ours, *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        parent = os.getpid()
        self.log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in finish()
        self._reader = open(self.log_path, "rb")  # noqa: SIM115 -- closed in finish()
        self._partial = b""
        self.report: list[bytes] = []
        self.started = time.monotonic()
        self.wall_s = 0.0
        try:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent))  # noqa: PLW1509 -- no threads here
        except BaseException:
            self._reader.close()
            self.log.close()
            raise

    @property
    def cache_dir(self) -> Path:
        return CACHE / f"shard{self.number}"

    def poll_lines(self) -> list[bytes]:
        """Complete lines written since the last look; non-progress ones kept for the end."""
        data = self._partial + self._reader.read()
        *lines, self._partial = data.split(b"\n")
        progress = []
        for line in lines:
            (progress if is_progress(line) else self.report).append(line)
        return progress

    def finish(self) -> list[bytes]:
        """The shard has exited: read the rest; return its last progress lines."""
        self.wall_s = time.monotonic() - self.started
        progress = self.poll_lines()
        if self._partial:
            self.report.append(self._partial)
            self._partial = b""
        self._reader.close()
        self.log.close()
        return progress

    def kill(self) -> None:
        """Kill the shard's whole session: pytest and whatever its tests started."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            self.proc.kill()


class _Stop:
    """SIGINT or SIGTERM to the runner: each is passed on to the shards as one SIGINT.

    pytest stops at the first, tears down and prints its report; a second cuts the
    teardown short, as at a terminal.  A third signal, or ``KILL_AFTER_S`` after the
    first, kills the shards still running.
    """

    KILL_AFTER_S = 30.0

    def __init__(self) -> None:
        self.since: float | None = None
        self.received = 0
        self._passed_on = 0

    def note(self, _signum: int, _frame: object) -> None:
        self.received += 1
        if self.since is None:
            self.since = time.monotonic()

    def act(self, pending: Sequence[_Running]) -> None:
        if self.since is None:
            return
        kill = self.received >= 3 or time.monotonic() - self.since >= self.KILL_AFTER_S
        while self._passed_on < self.received or kill:
            for r in pending:
                if r.proc.poll() is None:
                    if kill:
                        r.kill()
                    else:
                        r.proc.send_signal(signal.SIGINT)
            if kill:
                break
            self._passed_on += 1


def _trimmed(lines: list[bytes]) -> list[bytes]:
    """``lines`` without the blank lines at either end."""
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _write(line: bytes) -> None:
    """One line to stdout as the shard wrote it (its bytes: any encoding passes)."""
    out = sys.stdout.buffer
    out.write(line + b"\n")
    out.flush()


def _print(text: str) -> None:
    _write(text.encode(sys.stdout.encoding or "utf-8", "replace"))


def _prune_kept(tmpdir: str) -> None:
    """Remove what failed runs kept more than ``KEEP_S`` ago (pytest keeps its last 3)."""
    now = time.time()
    try:
        names = os.listdir(tmpdir)
    except OSError:
        return
    for name in names:
        path = os.path.join(tmpdir, name)
        try:
            old = name.startswith(KEPT_PREFIX) and now - os.stat(path).st_mtime > KEEP_S
        except OSError:
            continue
        if old:
            shutil.rmtree(path, ignore_errors=True)


def run(args: Sequence[str], parsed: Args, jobs: int, *, record: bool = False) -> int:
    """Run ``args`` as ``jobs`` shards (``parsed``: what :func:`parse_args` read of them)."""
    files = suite_files()
    weights = load_weights()
    shards = deal(files, weights, jobs)
    t0 = time.monotonic()
    _prune_kept(tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix=KEPT_PREFIX))
    _print(f"{len(files)} test files in {len(shards)} shards "
           f"(TEST_JOBS={jobs}; expected " +
           ", ".join(f"{s.expected_s:.0f} s" for s in shards) + ")")
    unknown = [f for f in files if f not in weights]
    if unknown:
        _print(f"{_plural(len(unknown), 'file')} without a weight, counted as "
               f"{DEFAULT_WEIGHT:g} s: to deal by measured times, run "
               f"`python tests/run_shards.py --record`")
    stop = _Stop()
    old = {sig: signal.signal(sig, stop.note) for sig in (signal.SIGINT, signal.SIGTERM)}
    running: list[_Running] = []
    pending: list[_Running] = []
    cut: dict[int, float] = {}  # shards stopped by -x (when): their "interrupted" is ours
    if not parsed.no_cache:
        seed_last_failed(shards)
    try:
        for n, s in enumerate(shards):
            r = _Running(n + 1, s, files, args, parsed, tmp, record)
            running.append(r)
            pending.append(r)
        while pending:
            time.sleep(0.2)
            stop.act(pending)
            for r in list(pending):
                for line in r.poll_lines():
                    _write(f"[{r.number}] ".encode() + line)
                if r.proc.poll() is None:
                    since = cut.get(r.number)
                    if since is not None and time.monotonic() - since > _Stop.KILL_AFTER_S:
                        r.kill()
                    continue
                for line in r.finish():
                    _write(f"[{r.number}] ".encode() + line)
                pending.remove(r)
                _print(f"---- shard {r.number}/{len(shards)}: "
                       f"{_plural(len(r.shard.files), 'file')}, "
                       f"exit {r.proc.returncode}, {r.wall_s:.0f} s ----")
                for line in _trimmed(r.report):
                    _write(line)
                if parsed.exit_first and r.number not in cut \
                        and r.proc.returncode not in (0, NO_TESTS):
                    for other in pending:
                        if other.number not in cut and other.proc.poll() is None:
                            cut[other.number] = time.monotonic()
                            other.proc.send_signal(signal.SIGINT)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for r in pending:  # only after an error of our own: leave no shard behind
            r.kill()
            r.proc.wait()
            r.finish()
    status = merge_status([r.proc.returncode for r in running if r.number not in cut])
    totals: dict[str, int] = {}
    for r in running:
        for kind, n in outcome_counts(r.report).items():
            totals[kind] = totals.get(kind, 0) + n
    counts = ", ".join(_plural(totals[k], k) if k in ("error", "warning") else f"{totals[k]} {k}"
                       for k in _ORDER if k in totals)
    _print(f"all shards: {counts or 'no counts'} in {time.monotonic() - t0:.0f} s ("
           + "; ".join(f"shard {r.number}: {r.wall_s:.0f} s, exit {r.proc.returncode}"
                       for r in running) + f") -> exit {status}")
    if not parsed.no_cache:
        merge_last_failed(running)
    if record and status == 0 and stop.since is None:
        write_weights([r.junit for r in running if r.junit is not None], files, weights)
    if status in (0, NO_TESTS):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        _print(f"logs and temporary files of the shards: {tmp}")
    return status


def _last_failed_path(cache: Path) -> Path:
    return cache / "v" / "cache" / "lastfailed"


def _read_last_failed(cache: Path) -> dict[str, bool]:
    try:
        entries = json.loads(_last_failed_path(cache).read_text())
    except (OSError, ValueError):
        return {}
    return {k: True for k in entries if isinstance(k, str)} if isinstance(entries, dict) else {}


def _write_last_failed(cache: Path, entries: dict[str, bool]) -> None:
    target = _last_failed_path(cache)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace_text(target, json.dumps(entries, indent=2, sort_keys=True))
    except OSError as exc:
        _print(f"could not record the failures for --lf in {target}: {exc}")


def _owner(node_id: str, shards: Sequence[Shard]) -> int:
    """The shard (from 1) whose pytest runs ``node_id``: its file's, else 1 (see
    ``pytest_ignore_collect``)."""
    path = node_id.split("::", 1)[0]
    for n, s in enumerate(shards, 1):
        if path in s.files:
            return n
    return 1


def seed_last_failed(shards: Sequence[Shard], cache: Path = CACHE) -> None:
    """Give each shard's cache pytest's own record of its tests' failures, so that a shard
    that does not run a test (``-k``, a crash) keeps it as pytest would."""
    known = _read_last_failed(cache)
    for n in range(1, len(shards) + 1):
        _write_last_failed(cache / f"shard{n}",
                           {k: True for k in known if _owner(k, shards) == n})


def merge_last_failed(running: Sequence[_Running], cache: Path = CACHE) -> None:
    """Put the shards' failures in pytest's own cache, for a later ``--lf`` (one process).

    A shard's cache may hold failures of tests it does not own (its files moved, or a
    plain run's): each test's record comes from its owner's cache only.
    """
    shards = [r.shard for r in running]
    failed: dict[str, bool] = {}
    for r in running:
        failed.update({k: True for k in _read_last_failed(r.cache_dir)
                       if _owner(k, shards) == r.number})
    _write_last_failed(cache, failed)


def write_weights(junit_files: Sequence[Path], files: Sequence[str],
                  old: dict[str, float] | None = None, path: Path = WEIGHTS) -> None:
    """Sum a run's per-test seconds (setup, call and teardown) by file into ``path``.

    Every suite file gets an entry: a file none of whose tests ran keeps its old weight
    (or the minimum).
    """
    totals = {f: (old or {}).get(f, 0.0) for f in files}
    measured: dict[str, float] = {}
    for j in junit_files:
        for case in ET.parse(j).iter("testcase"):
            f = case.get("file")
            if f:
                measured[f] = measured.get(f, 0.0) + float(case.get("time") or 0.0)
    totals.update(measured)
    _replace_text(path, json.dumps({f: max(0.1, round(s, 1)) for f, s in
                                    sorted(totals.items())}, indent=1) + "\n")
    _print(f"wrote {path}: {len(totals)} files, {sum(totals.values()):.0f} s")


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def _addopts() -> list[str]:
    """``PYTEST_ADDOPTS``: options every shard's pytest reads before the command line."""
    try:
        return shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    except ValueError:
        return []  # pytest reports it


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    record = "--record" in args
    if record:
        args.remove("--record")
    parsed = parse_args(_addopts() + args)
    jobs = default_jobs()
    if record and (parsed.names_tests or parsed.plain):
        sys.exit("--record times the whole suite: name no tests, and no "
                 f"{parsed.plain or 'test path'}")
    if not record and (jobs == 1 or parsed.names_tests or parsed.plain):
        # Exactly as plain pytest: its own signals, teardown and exit status.
        os.chdir(ROOT)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "pytest", *args])
    return run(args, parsed, jobs, record=record)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
