"""Command line: ``python -m runtime gc [--dry-run]`` and ``python -m runtime doctor``."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys

from runtime.session import collect


def _shm_dirs(args: argparse.Namespace) -> list[str]:
    dirs = list(args.shm_dir or [])
    if not dirs:
        dirs = [os.environ.get("RT_SHM_DIR") or "/dev/shm"]
    return dirs


def cmd_gc(args: argparse.Namespace) -> int:
    removed = collect(_shm_dirs(args), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path, reason in removed:
        print(f"{verb} {path}  ({reason})")
    print(f"{verb} {len(removed)} path(s)" if removed else "nothing to collect")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from runtime.system import SystemOptions

    print(f"python      {sys.version.split()[0]} on {platform.system()} {platform.machine()}")
    for mod in ("torch", "numpy", "zmq", "cloudpickle", "psutil"):
        try:
            m = __import__(mod)
            version = getattr(m, "__version__", "?")
            if mod == "zmq":
                version += f" (libzmq {m.zmq_version()})"
            print(f"{mod:<11} {version}")
        except ImportError as exc:
            print(f"{mod:<11} MISSING ({exc})")
    try:
        import torch

        cuda = torch.cuda.is_available()
        detail = f"yes, {torch.cuda.device_count()} device(s): " \
                 f"{torch.cuda.get_device_name(0)}" if cuda else "no"
        print(f"cuda        {detail}")
    except ImportError:
        pass
    try:
        opts = SystemOptions.build()
    except ValueError as exc:
        print(f"options     INVALID: {exc}")
        return 1
    print(f"threshold   {opts.shm_threshold} bytes "
          f"({'RT_SHM_THRESHOLD' if os.environ.get('RT_SHM_THRESHOLD') else 'default'})")
    for d in _shm_dirs(args):
        try:
            usage = shutil.disk_usage(d)
            print(f"shm_dir     {d}: {usage.total / 2**20:.0f} MiB, "
                  f"{usage.free / 2**20:.0f} MiB free")
            from runtime.transport.channel import ring_capacity

            need = 2 * (ring_capacity(opts.shm_threshold) + 4096)
            if usage.free < need:
                print(f"            WARNING: one channel needs {need / 2**20:.0f} MiB; "
                      "channels will fall back to ZeroMQ")
        except OSError as exc:
            print(f"shm_dir     {d}: UNUSABLE ({exc})")
    stale = collect(_shm_dirs(args), dry_run=True)
    print(f"stale       {len(stale)} path(s) of dead sessions"
          + (" (run: python -m runtime gc)" if stale else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime",
                                     description="Maintenance of the actor runtime.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    gc = sub.add_parser("gc", help="remove segments and private directories of dead sessions",
                        description="Remove shared-memory segments and private directories "
                                    "of sessions whose driver or supervisor is gone.")
    gc.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    gc.add_argument("--shm-dir", action="append",
                    help="directory to scan (default: $RT_SHM_DIR or /dev/shm); repeatable")
    gc.set_defaults(func=cmd_gc)
    doc = sub.add_parser("doctor", help="check versions, CUDA, shm_dir and the threshold",
                         description="Print what the runtime would use on this machine.")
    doc.add_argument("--shm-dir", action="append", help="directory to check; repeatable")
    doc.set_defaults(func=cmd_doctor)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
