"""The shard runner behind ``make test`` (``tests/run_shards.py``, ``tests/shard_plugin.py``):
how it deals files, reads arguments, merges, reports and stops.  The end-to-end tests run
it on throwaway projects of a few tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import run_shards
from tests.run_shards import deal, is_progress, merge_status, parse_args

RUNNER = Path(run_shards.__file__)


def test_deal_puts_every_file_in_exactly_one_shard_and_balances_the_longest_first():
    weights = {"a": 90.0, "b": 60.0, "c": 50.0, "d": 40.0, "e": 10.0}
    files = ["a", "b", "c", "d", "e", "f"]  # f: unknown, DEFAULT_WEIGHT
    shards = deal(files, weights, 2)
    assert sorted(f for s in shards for f in s.files) == files
    for s in shards:
        assert s.expected_s == sum(weights.get(f, run_shards.DEFAULT_WEIGHT) for f in s.files)
    assert max(s.expected_s for s in shards) == 130.0  # a + d: the best split of these
    for s in shards:  # the suite's order within a shard
        assert s.files == sorted(s.files, key=files.index)


def test_deal_drops_empty_shards_and_takes_at_least_one():
    assert [s.files for s in deal(["a"], {}, 4)] == [["a"]]
    assert [s.files for s in deal(["a", "b"], {}, 0)] == [["a", "b"]]
    assert deal([], {}, 2) == []


def test_suite_files_are_pytests_default_test_modules(tmp_path):
    for name in ("tests/test_a.py", "tests/sub/b_test.py", "tests/helper.py",
                 "tests/conftest.py", "other/test_c.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert run_shards.suite_files(tmp_path) == ["tests/sub/b_test.py", "tests/test_a.py"]


@pytest.mark.parametrize("args", [
    ["-q", "-rf", "-k", "codec", "-m", "not slow"],
    ["-q", "-m", ""],  # make test-all
    ["-k", "tests"], ["-k", "runtime or docs"],  # values, not paths
    ["--deselect", "tests/unit/test_codec.py::test_x"], ["--ignore", "tests/faults"],
    ["--rootdir", "."], ["-c", "setup.cfg"], ["-o", "cache_dir=tests"],
    ["no/such/file.py"], [""], ["--deselect=tests/x.py::t"],
])  # fmt: skip
def test_options_and_their_values_name_no_tests(args):
    parsed = parse_args(args)
    assert not parsed.names_tests and parsed.plain is None


@pytest.mark.parametrize("args", [
    ["tests/unit"], ["-q", "tests/unit/test_codec.py::test_something"], ["--", "tests"],
    ["-k", "x", "tests/unit/test_codec.py"],
])  # fmt: skip
def test_paths_name_tests(args):
    assert parse_args(args).names_tests


@pytest.mark.parametrize(("args", "option"), [
    (["--junitxml=out.xml"], "--junitxml"), (["--junitxml", "out.xml"], "--junitxml"),
    (["--basetemp=/tmp/x"], "--basetemp"), (["--lf"], "--lf"), (["--sw"], "--sw"),
    (["--pyargs", "tests.unit.test_codec"], "--pyargs"), (["--pdb"], "--pdb"),
    (["-h"], "-h"), (["--co"], "--co"),
    (["-q", "--deselect"], "--deselect"), (["-k"], "-k"),  # no value: pytest's usage error
])  # fmt: skip
def test_options_one_process_must_honour_are_named(args, option):
    assert parse_args(args).plain == option


@pytest.mark.parametrize(("args", "first"), [
    (["-x"], True), (["-qx"], True), (["-xq"], True), (["--exitfirst"], True),
    (["--maxfail=1"], True), (["--maxfail", "1"], True),
    (["-rx"], False), (["-rfx"], False), (["--maxfail=3"], False), (["--maxfail", "0"], False),
    (["-k", "x"], False), (["-kx"], False),
])  # fmt: skip
def test_exit_first_is_read_from_every_spelling(args, first):
    assert parse_args(args).exit_first is first


def test_no_cacheprovider_is_seen_in_both_spellings():
    assert parse_args(["-p", "no:cacheprovider"]).no_cache
    assert parse_args(["-pno:cacheprovider"]).no_cache
    assert not parse_args(["-p", "no:randomly"]).no_cache


def test_merge_status_is_the_worst_shard():
    assert merge_status([0, 0]) == 0
    assert merge_status([0, 1]) == 1
    assert merge_status([2, 1]) == 2
    assert merge_status([5, 0]) == 0  # one shard's tests were all deselected
    assert merge_status([5, 5]) == 5
    assert merge_status([-9, 0]) == 137  # a shard killed by SIGKILL
    assert merge_status([]) == 0


def test_outcome_counts_read_pytests_final_line():
    assert run_shards.outcome_counts([b"x", b"3 passed, 1 error, 2 warnings in 0.2s"]) == \
        {"passed": 3, "error": 1, "warning": 2}
    assert run_shards.outcome_counts([b"\x1b[32m1 failed, 4 skipped in 1.0s\x1b[0m", b""]) == \
        {"failed": 1, "skipped": 4}
    assert run_shards.outcome_counts([b"no summary"]) == {}


def test_progress_lines_are_told_from_reports():
    assert is_progress(b"........................ [ 42%]")
    assert is_progress(b"..sF.E.. [100%]")
    assert is_progress(b"\x1b[32m....\x1b[0m\x1b[32m [ 5%]\x1b[0m")
    assert is_progress(b"tests/unit/test_x.py::test_y PASSED                   [ 12%]")  # -v
    assert not is_progress(b"FAILED tests/unit/test_x.py::test_y - assert 1 == 2")
    assert not is_progress(b"1 passed in 0.01s")


# --------------------------------------------------------------------- end to end

# Every test of these projects leaves a marker once its teardown has run.
CONFTEST = """\
import os, time, pytest

@pytest.fixture(autouse=True)
def marked_teardown(request):
    yield
    time.sleep(float(os.environ.get("TEARDOWN_S", "0")))
    open(os.path.join(os.environ["MARKS"], "done." + request.node.name + "." +
                      str(os.getpid())), "w").close()
"""
PASSING = "def test_one():\n    pass\n\ndef test_two():\n    pass\n"
FAILING = "def test_bad():\n    assert 1 == 2, 'the planted failure'\n"
HANG = """\
import os, time

def test_hang():
    open(os.path.join(os.environ["MARKS"], "started." + str(os.getpid())), "w").close()
    time.sleep(60)
"""


def _project(root: Path, tests: dict[str, str]) -> Path:
    """A throwaway project: the runner, a conftest and some test files, nothing else."""
    (root / "tests").mkdir(parents=True)
    (root / "marks").mkdir()
    (root / "tmp").mkdir()
    shutil.copy(RUNNER, root / "tests" / "run_shards.py")
    shutil.copy(RUNNER.with_name("shard_plugin.py"), root / "tests" / "shard_plugin.py")
    (root / "tests" / "conftest.py").write_text(CONFTEST)
    for name, body in tests.items():
        (root / "tests" / name).write_text(body)
    return root


def _env(root: Path, **extra: str) -> dict[str, str]:
    """The runner's environment: its temporary files (kept after a failed run) in ``root``."""
    env = dict(os.environ, TMPDIR=str(root / "tmp"), MARKS=str(root / "marks"), TEST_JOBS="2")
    env.update(extra)
    return env


def _runner(root: Path, *args: str, sigint_ignored: bool = False,
            **env: str) -> subprocess.Popen:
    cmd = [sys.executable, str(root / "tests" / "run_shards.py"), "-q", *args]
    if sigint_ignored:  # as a shell starts a background job; exec keeps the ignore
        cmd = ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *cmd]
    return subprocess.Popen(cmd, cwd=root, env=_env(root, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _run(root: Path, *args: str, **env: str) -> tuple[int, str]:
    p = _runner(root, *args, **env)
    out, _ = p.communicate(timeout=60)
    return p.returncode, out.decode("utf-8", "replace")


def _marks(root: Path, kind: str) -> list[str]:
    return sorted(n for n in os.listdir(root / "marks") if n.startswith(kind + "."))


def _wait_started(root: Path, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(_marks(root, "started")) < n:
        assert time.monotonic() < deadline, "the shards never reached their test"
        time.sleep(0.05)


def _blocks(out: str) -> list[list[str]]:
    """Each shard's report: the lines after its '---- shard' header, up to the next one."""
    blocks: list[list[str]] = []
    for line in out.splitlines():
        if line.startswith("---- shard"):
            blocks.append([])
        elif line.startswith("all shards:"):
            break
        elif blocks:
            blocks[-1].append(line)
    return blocks


def test_pytests_own_collection_rules_hold_in_the_shards(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "thing_test.py": FAILING,
                               "test_c.py": PASSING})
    (root / "tests" / "sub").mkdir()
    (root / "tests" / "sub" / "test_d.py").write_text(FAILING)
    rc, out = _run(root)  # thing_test.py: a test module the runner's table does not know
    assert rc == 1 and "all shards: 4 passed, 2 failed" in out, out
    rc, out = _run(root, "--ignore=tests/sub", "--deselect", "tests/thing_test.py::test_bad")
    assert rc == 0 and "in 2 shards" in out and "all shards: 4 passed, 1 deselected" in out, out


def test_a_shard_that_cannot_collect_or_dies_fails_the_run(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_c.py": PASSING})
    (root / "tests" / "sub").mkdir()
    (root / "tests" / "sub" / "conftest.py").write_text("import no_such_module\n")
    (root / "tests" / "sub" / "test_d.py").write_text(PASSING)
    rc, out = _run(root)
    assert rc not in (0, 5), out
    (root / "tests" / "sub" / "conftest.py").unlink()
    (root / "tests" / "sub" / "test_d.py").write_text(
        "import os, signal\n\ndef test_crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    rc, out = _run(root)
    assert rc == 128 + signal.SIGSEGV and f"exit -{int(signal.SIGSEGV)}" in out, out


def test_a_trailing_option_without_its_value_is_pytests_usage_error(tmp_path):
    root = _project(tmp_path, {"test_a.py": FAILING, "test_c.py": PASSING})
    rc, out = _run(root, "--deselect")
    assert rc == 4, out  # not 0 with a shard's file taken for the option's value


def test_a_failing_shard_fails_the_run_and_its_report_is_printed_whole(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_b.py": FAILING,
                               "test_c.py": PASSING})
    rc, out = _run(root)
    assert rc == 1, out
    assert "3 test files in 2 shards" in out
    assert any(line.startswith("[1] .") for line in out.splitlines())  # progress, live
    assert any(line.startswith("[2] ") for line in out.splitlines())
    blocks = _blocks(out)
    assert len(blocks) == 2
    for block in blocks:  # a report is printed whole, not line by line with a prefix
        assert not [line for line in block if line.startswith(("[1] ", "[2] "))]
    assert any("the planted failure" in line for block in blocks for line in block)
    assert "all shards: 4 passed, 1 failed in " in out and "-> exit 1" in out
    kept = [line.split(": ", 1)[1] for line in out.splitlines()
            if line.startswith("logs and temporary files of the shards: ")]
    assert len(kept) == 1 and Path(kept[0]).parent == root / "tmp"
    assert (Path(kept[0]) / "shard1.log").exists()  # kept, for a failed run


def test_a_passing_run_exits_zero_and_leaves_no_temporary_files(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_c.py": PASSING})
    rc, out = _run(root)
    assert rc == 0, out
    assert "-> exit 0" in out
    assert list((root / "tmp").iterdir()) == []


def test_a_kept_directory_older_than_a_day_goes_with_the_next_run(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_c.py": PASSING})
    old, new = root / "tmp" / "pytest-shards-old", root / "tmp" / "pytest-shards-new"
    old.mkdir()
    new.mkdir()
    os.utime(old, (time.time() - 2 * run_shards.KEEP_S,) * 2)
    rc, out = _run(root)
    assert rc == 0, out
    assert not old.exists() and new.exists()


def test_make_test_all_is_sharded_and_deselecting_a_whole_shard_is_no_failure(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_c.py": "def test_x():\n    pass\n"})
    rc, out = _run(root, "-m", "")
    assert rc == 0 and "in 2 shards" in out, out
    rc, out = _run(root, "-k", "one")
    assert rc == 0 and "in 2 shards" in out, out


def test_named_test_files_and_one_job_run_as_one_plain_pytest(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_b.py": FAILING})
    rc, out = _run(root, "tests/test_a.py")
    assert rc == 0, out
    assert "shards" not in out and "2 passed" in out
    rc, out = _run(root, TEST_JOBS="1")
    assert rc == 1 and "shards" not in out and "1 failed, 2 passed" in out


def test_one_output_file_means_one_plain_pytest(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_c.py": PASSING})
    rc, out = _run(root, f"--junitxml={tmp_path / 'out.xml'}")
    assert rc == 0 and "shards" not in out, out
    assert 'tests="4"' in (tmp_path / "out.xml").read_text()  # not one shard's half


def test_no_cacheprovider_gets_no_cache_dir_option(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_c.py": PASSING})
    rc, out = _run(root, "-p", "no:cacheprovider", "-W", "error::pytest.PytestConfigWarning")
    assert rc == 0 and "in 2 shards" in out, out
    assert not (root / ".pytest_cache").exists()


def test_last_failed_after_a_sharded_run_reruns_exactly_its_failures(tmp_path):
    root = _project(tmp_path, {"test_a.py": FAILING, "test_b.py": PASSING,
                               "test_c.py": FAILING})
    (root / "tests" / "shard_weights.json").write_text(
        json.dumps({"tests/test_a.py": 5, "tests/test_b.py": 1, "tests/test_c.py": 1}))
    rc, out = _run(root)  # a alone in one shard, b and c in the other: failures in both
    assert rc == 1, out
    rc, out = _run(root, "--lf")
    assert rc == 1 and "shards" not in out, out
    assert "2 failed" in out and "passed" not in out.splitlines()[-1], out


def test_last_failed_keeps_what_plain_runs_and_unselected_tests_recorded(tmp_path):
    root = _project(tmp_path, {"test_a.py": FAILING, "test_b.py": PASSING,
                               "test_c.py": PASSING})
    assert _run(root)[0] == 1
    (root / "tests" / "test_a.py").write_text(PASSING)  # fixed
    assert _run(root, "--lf")[0] == 0
    (root / "tests" / "test_c.py").write_text(FAILING)  # broken, seen by a plain run
    assert _run(root, "tests/test_c.py")[0] == 1
    assert _run(root, "-k", "test_one")[0] == 0  # sharded, test_c not selected
    rc, out = _run(root, "--lf")
    assert rc == 1 and "the planted failure" in out, out  # still known to have failed


def test_record_writes_the_weights_of_every_file(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING,
                               "test_slow.py": "import time\n\ndef test_s():\n"
                                               "    time.sleep(0.5)\n",
                               "test_none.py": "import pytest\n\n@pytest.mark.skipif(True, "
                                               "reason='x')\ndef test_n():\n    pass\n"})
    rc, out = _run(root, "--record", "-k", "not test_n")
    assert rc == 0, out
    weights = json.loads((root / "tests" / "shard_weights.json").read_text())
    assert set(weights) == {"tests/test_a.py", "tests/test_slow.py", "tests/test_none.py"}
    assert weights["tests/test_slow.py"] >= 0.5 > weights["tests/test_a.py"]
    assert weights["tests/test_none.py"] == 0.1  # deselected: the minimum, not missing


@pytest.mark.parametrize("how", ["ctrl-c at a terminal", "SIGTERM to the runner",
                                 "ctrl-c, the runner started with SIGINT ignored"])
def test_a_signal_stops_the_shards_after_their_teardown_with_their_reports(tmp_path, how):
    root = _project(tmp_path, {"test_a.py": HANG, "test_b.py": HANG})
    p = _runner(root, TEARDOWN_S="1.0", sigint_ignored="ignored" in how)
    _wait_started(root, 2)
    if how.startswith("ctrl-c"):
        os.killpg(p.pid, signal.SIGINT)  # the terminal's process group: the runner's
    else:
        p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    out = out.decode()
    assert p.returncode == 2, out  # pytest's "interrupted", not a signal's death
    assert len(_marks(root, "done")) == 2, out  # each teardown ran to its end
    assert out.count("KeyboardInterrupt") >= 2, out  # each shard's own report
    assert "-> exit 2" in out


def test_ctrl_c_with_one_job_is_plain_pytests_own(tmp_path):
    root = _project(tmp_path, {"test_a.py": HANG})
    p = _runner(root, TEST_JOBS="1", TEARDOWN_S="1.0")
    _wait_started(root, 1)
    os.killpg(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 2, out
    assert len(_marks(root, "done")) == 1, out


def test_shards_stop_with_their_teardown_when_the_runner_is_killed(tmp_path):
    root = _project(tmp_path, {"test_a.py": HANG, "test_b.py": HANG})
    p = _runner(root, TEARDOWN_S="0.5")
    _wait_started(root, 2)
    shards = psutil.Process(p.pid).children()
    assert len(shards) == 2
    p.kill()
    p.communicate(timeout=30)
    _, alive = psutil.wait_procs(shards, timeout=30)
    assert not alive
    assert len(_marks(root, "done")) == 2


def test_exitfirst_stops_the_other_shards_at_the_first_failure(tmp_path):
    root = _project(tmp_path, {"test_a.py": HANG, "test_b.py": FAILING})
    t0 = time.monotonic()
    rc, out = _run(root, "-x")
    assert time.monotonic() - t0 < 30, out
    assert rc == 1, out  # the failure's status, not the stopped shard's
    assert "the planted failure" in out and "KeyboardInterrupt" in out


def test_exitfirst_cuts_nothing_for_a_shard_that_selected_nothing(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_b.py": FAILING,
                               "test_c.py": "def test_other():\n    pass\n"})
    rc, out = _run(root, "-x", "-k", "one or bad", TEST_JOBS="3")
    assert rc == 1, out


def test_a_shard_that_ignores_its_stop_is_killed_with_what_it_started(tmp_path, monkeypatch):
    stubborn = """\
import subprocess, time

def test_stubborn():
    subprocess.Popen(["sleep", "120"])
    while True:
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            pass
"""
    root = _project(tmp_path, {"test_a.py": stubborn, "test_b.py": FAILING})
    shutil.copy(RUNNER, root / "tests" / "run_shards.py")
    text = (root / "tests" / "run_shards.py").read_text()
    (root / "tests" / "run_shards.py").write_text(
        text.replace("KILL_AFTER_S = 30.0", "KILL_AFTER_S = 1.0"))
    before = set(_sleeps())
    rc, out = _run(root, "-x")
    assert rc == 1, out
    deadline = time.monotonic() + 5
    while set(_sleeps()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(_sleeps()) - before, out  # the shard's whole session went


def _sleeps() -> list[int]:
    """Live ``sleep 120`` processes."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.name() == "sleep" and p.status() != psutil.STATUS_ZOMBIE \
                    and p.cmdline()[1:] == ["120"]:
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def test_maxfail_above_one_lets_the_other_shards_run_on(tmp_path):
    slow = "import time\n\ndef test_slow():\n    time.sleep(1.5)\n"
    root = _project(tmp_path, {"test_a.py": slow, "test_b.py": FAILING})
    rc, out = _run(root, "--maxfail=3")
    assert rc == 1, out
    assert "all shards: 1 passed, 1 failed" in out


def test_a_report_in_another_encoding_passes_through(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING,
                               "test_b.py": "def test_bad():\n    assert 0, 'caf\\xe9'\n"})
    p = _runner(root, PYTHONIOENCODING="latin-1")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 1, out
    assert b"caf\xe9" in out and b"-> exit 1" in out


@pytest.mark.parametrize("value", ["two", "-"])
def test_a_bad_test_jobs_is_refused_by_name(tmp_path, value):
    root = _project(tmp_path, {"test_a.py": PASSING})
    rc, out = _run(root, TEST_JOBS=value)
    assert rc != 0
    assert "TEST_JOBS" in out
