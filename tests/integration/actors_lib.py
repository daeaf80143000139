"""Actor classes shared by the integration and fault tests (an importable module)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

from runtime import actor


@actor
class Echo:
    def __init__(self, tag="echo"):
        self.tag = tag
        self.calls = 0

    def echo(self, x):
        self.calls += 1
        return x

    def add(self, a, b=0):
        return a + b

    def count(self):
        return self.calls

    def pid_(self):
        return os.getpid()

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def spin(self, seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return seconds

    def fail(self, kind, message):
        raise {"value": ValueError, "key": KeyError, "runtime": RuntimeError,
               "custom": CustomError}[kind](message)

    def fail_unpicklable(self):
        raise UnpicklableError("cannot travel", threading.Lock())

    def exit(self, code):
        sys.exit(code)

    def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def ones(self, n):
        return torch.ones(n)

    def weird(self):
        return {1, 2, 3}


class CustomError(Exception):
    """A user exception type that must keep its identity across the boundary."""


class UnpicklableError(Exception):
    def __init__(self, message, lock):
        super().__init__(message)
        self.lock = lock


@actor
class Caller:
    """Calls another actor through a handle it was given."""

    def __init__(self, other):
        self.other = other

    def relay(self, x):
        return self.other.echo(x)

    def relay_many(self, n):
        futs = [self.other.add.remote(i, 1) for i in range(n)]
        return [f.result(timeout=30) for f in futs]


@actor
class FailingInit:
    def __init__(self, message):
        raise ValueError(message)


@actor(untrusted=True)
class Untrusted:
    def tensor(self, n):
        return torch.arange(n)

    def obj(self):
        return {"a": {1, 2}}

    def fail(self):
        raise KeyError("from the untrusted side")


@actor(max_restarts=2)
class Restartable:
    def __init__(self, base):
        self.base = base

    def add(self, x):
        return x + self.base

    def pid_(self):
        return os.getpid()

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds


@actor
class Timer:
    """Times one call to another actor from its own process."""

    def __init__(self, other):
        self.other = other

    def time_call(self):
        t0 = time.monotonic()
        self.other.add(1, 1)
        return time.monotonic() - t0
