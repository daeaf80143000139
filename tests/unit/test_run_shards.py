"""The shard runner behind ``make test``: how it deals files, merges, reports and stops."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import run_shards
from tests.run_shards import deal, is_progress, merge_status, names_tests

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


def test_the_weights_table_names_every_test_file():
    weights = run_shards.load_weights()
    missing = set(run_shards.suite_files()) - set(weights)
    assert not missing, f"run `python tests/run_shards.py --record`: {sorted(missing)}"


def test_names_tests_tells_paths_from_options():
    assert not names_tests(["-q", "-rf", "-k", "codec", "-m", "not slow"])
    assert names_tests(["tests/unit"])
    assert names_tests(["-q", "tests/unit/test_codec.py::test_something"])
    assert not names_tests(["no/such/file.py"])


def test_merge_status_is_the_worst_shard():
    assert merge_status([0, 0]) == 0
    assert merge_status([0, 1]) == 1
    assert merge_status([2, 1]) == 2
    assert merge_status([5, 0]) == 0  # one shard's tests were all deselected
    assert merge_status([5, 5]) == 5
    assert merge_status([-9, 0]) == 137  # a shard killed by SIGKILL
    assert merge_status([]) == 0


def test_outcome_counts_read_pytests_final_line():
    assert run_shards.outcome_counts(["x", "3 passed, 1 error, 2 warnings in 0.2s"]) == \
        {"passed": 3, "error": 1, "warning": 2}
    assert run_shards.outcome_counts(["\x1b[32m1 failed, 4 skipped in 1.0s\x1b[0m", ""]) == \
        {"failed": 1, "skipped": 4}
    assert run_shards.outcome_counts(["no summary"]) == {}


def test_progress_lines_are_told_from_reports():
    assert is_progress("........................ [ 42%]")
    assert is_progress("..sF.E.. [100%]")
    assert is_progress("\x1b[32m....\x1b[0m\x1b[32m [ 5%]\x1b[0m")
    assert not is_progress("FAILED tests/unit/test_x.py::test_y - assert 1 == 2")
    assert not is_progress("1 passed in 0.01s")


def _project(tmp_path: Path, tests: dict[str, str]) -> Path:
    """A throwaway project: the runner and some test files, nothing else."""
    (tmp_path / "tests").mkdir(parents=True)
    shutil.copy(RUNNER, tmp_path / "tests" / "run_shards.py")
    for name, body in tests.items():
        (tmp_path / "tests" / name).write_text(body)
    return tmp_path


def _env(root: Path, **extra: str) -> dict[str, str]:
    """The runner's environment: its temporary files (kept after a failed run) in ``root``."""
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp), **extra)


def _runner(root: Path, *args: str, jobs: int = 2, **kw) -> subprocess.Popen:
    env = _env(root, TEST_JOBS=str(jobs))
    return subprocess.Popen([sys.executable, str(root / "tests" / "run_shards.py"), "-q", *args],
                            cwd=root, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kw)


PASSING = "def test_one():\n    pass\n\ndef test_two():\n    pass\n"
FAILING = "def test_bad():\n    assert 1 == 2, 'the planted failure'\n"


def test_a_failing_shard_fails_the_run_and_its_report_is_printed_whole(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_b.py": FAILING,
                               "test_c.py": PASSING})
    p = _runner(root)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 1, out
    assert "3 test files in 2 shards" in out
    assert "---- shard 1/2" in out and "---- shard 2/2" in out
    assert "the planted failure" in out
    assert "all shards: 4 passed, 1 failed in " in out
    assert "-> exit 1" in out
    report = out[out.index("the planted failure"):]
    assert "[1] " not in report.splitlines()[0]  # the report is not interleaved line by line
    assert f"logs and temporary files of the shards: {root / 'tmp'}" in out  # kept


def test_a_passing_run_exits_zero_and_leaves_no_temporary_files(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_c.py": PASSING})
    p = _runner(root)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "-> exit 0" in out
    assert list((root / "tmp").iterdir()) == []


def test_exitfirst_stops_the_other_shards_at_the_first_failure(tmp_path):
    hang = "import time\n\ndef test_hang():\n    time.sleep(60)\n"
    root = _project(tmp_path, {"test_a.py": hang, "test_b.py": FAILING})
    t0 = time.monotonic()
    p = _runner(root, "-x")
    out, _ = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 30, out
    assert p.returncode == 1, out  # the failure's status, not the stopped shard's
    assert "the planted failure" in out and "KeyboardInterrupt" in out


def test_deselecting_everything_in_one_shard_is_not_a_failure(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_c.py": "def test_x():\n    pass\n"})
    p = _runner(root, "-k", "one")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out


def test_named_test_files_run_as_one_plain_pytest(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING, "test_b.py": FAILING})
    p = _runner(root, "tests/test_a.py")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "shards" not in out and "2 passed" in out


def test_record_writes_the_weights_of_every_file(tmp_path):
    root = _project(tmp_path, {"test_a.py": PASSING,
                               "test_slow.py": "import time\n\ndef test_s():\n"
                                               "    time.sleep(0.5)\n"})
    p = _runner(root, "--record")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    weights = json.loads((root / "tests" / "shard_weights.json").read_text())
    assert set(weights) == {"tests/test_a.py", "tests/test_slow.py"}
    assert weights["tests/test_slow.py"] >= 0.5 > weights["tests/test_a.py"]


def test_a_signal_to_the_runner_alone_stops_its_shards_with_their_reports(tmp_path):
    hang = "import time\n\ndef test_hang():\n    time.sleep(60)\n"
    root = _project(tmp_path, {"test_a.py": hang, "test_b.py": hang})
    p = _runner(root, start_new_session=True)  # the signal reaches the runner only
    first = p.stdout.readline()
    assert "2 test files in 2 shards" in first
    time.sleep(1.5)  # both shards are in their sleep by now
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 15
    assert p.returncode == 2, out  # pytest's "interrupted"
    assert out.count("KeyboardInterrupt") >= 2, out  # each shard's own report
    assert "-> exit 2" in out


@pytest.mark.parametrize("value", ["two", "-"])
def test_a_bad_test_jobs_is_refused_by_name(tmp_path, value):
    root = _project(tmp_path, {"test_a.py": PASSING})
    p = subprocess.run([sys.executable, str(root / "tests" / "run_shards.py")], cwd=root,
                       env=_env(root, TEST_JOBS=value), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0
    assert "TEST_JOBS" in p.stderr
