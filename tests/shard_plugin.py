"""The shard runner's pytest plugin: in each shard, drop the test modules of the others.

``tests/run_shards.py`` starts each shard as ``python -m pytest -p tests.shard_plugin
--shard-files=<list> ...``, with no test paths: pytest collects as it always does
(``testpaths``, ``--ignore``, ``collect_ignore``, ``python_files``), and this plugin
ignores the test modules dealt to other shards.  A test module the runner did not deal
(its table names ``tests/**/test_*.py`` and ``*_test.py``) goes to shard 1, so every test
pytest would collect runs exactly once.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import NamedTuple


def pytest_addoption(parser) -> None:
    parser.addoption("--shard-files", default=None,
                     help="(tests/run_shards.py) the JSON list of this shard's test files")


class _Share(NamedTuple):
    """Which test modules are this shard's own."""

    number: int
    mine: set[str]
    dealt: set[str]  # every shard's
    patterns: list[str]  # python_files


def pytest_configure(config) -> None:
    path = config.getoption("shard_files")
    if path:
        share = json.loads(Path(path).read_text())
        config._rt_share = _Share(share["number"], set(share["files"]), set(share["dealt"]),
                                  list(config.getini("python_files")))


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """Drop test modules another shard runs; a module nobody dealt goes to shard 1."""
    share: _Share | None = getattr(config, "_rt_share", None)
    if share is None or not any(fnmatch.fnmatch(collection_path.name, pat)
                                for pat in share.patterns) or not collection_path.is_file():
        return None
    try:
        rel = str(collection_path.relative_to(config.rootpath))
    except ValueError:
        rel = str(collection_path)
    if rel in share.mine:
        return None
    if rel in share.dealt or share.number != 1:
        return True
    return None
