"""`python train/main.py ARGS` for the tests, without paying its imports on every run.

A training process spends ~5 s of CPU importing torch, torchvision (which imports torch._dynamo) and transformers
(through open_clip) before it reads its first flag, and the suite starts dozens of single-process runs on 2 cores.
Here a multiprocessing forkserver imports those modules once per pytest worker; each run is a fresh child forked from
it, which takes the run's environment, working directory and argv, sends its stdout/stderr to files, runs
train/main.py as `__main__` (as `python train/main.py` does) and exits with its exit code. The forkserver itself never
runs a torch op, so no thread pool exists when it forks.

What differs from a real `python train/main.py`: the modules were imported under the forkserver's environment (the
pytest worker's), so a library that reads an environment variable at import time sees that one, not the run's;
train/main.py and clipkit read theirs at run time. Tests that need a fresh interpreter pass `fresh=True` to their
launcher (or set CLIPKIT_TEST_FRESH_PROCESS=1 for the whole suite).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List

PRELOAD = ["torch", "torchvision", "open_clip", "clipkit.train.config", "clipkit.train.loop"]
_CONTEXT = None


def enabled() -> bool:
    return os.environ.get("CLIPKIT_TEST_FRESH_PROCESS", "") in ("", "0")


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _child(argv: List[str], env: Dict[str, str], cwd: str, out_path: str, err_path: str, new_session: bool) -> None:
    import runpy
    import sys
    import traceback

    # A forkserver child inherits "forkserver" as its default start method; a real `python train/main.py` on Linux
    # forks its loader workers.
    multiprocessing.set_start_method("fork", force=True)
    if new_session:
        os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    code = 0
    try:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:  # sys.exit("message"): Python prints it and exits 1
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _read(path: str) -> str:
    if not os.path.exists(path):  # the child died before it opened its files
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    pid: int
    timed_out: bool


def run_script(argv: List[str], env: Dict[str, str], cwd: str, timeout: float, new_session: bool = False) -> Finished:
    """Runs `python ARGV` (argv[0] the script) in a child of the preloaded forkserver; waits up to `timeout` s, then
    kills it (its whole session with `new_session`)."""
    with tempfile.TemporaryDirectory(prefix="clipkit_zygote_") as d:
        out_path, err_path = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        proc = _context().Process(target=_child, args=(argv, env, cwd, out_path, err_path, new_session))
        proc.start()
        proc.join(timeout)
        timed_out = proc.is_alive()
        if timed_out:
            try:
                os.killpg(proc.pid, 9) if new_session else proc.kill()
            except ProcessLookupError:
                pass
            proc.join()

        out, err = (_read(path) for path in (out_path, err_path))
    return Finished(proc.exitcode if proc.exitcode is not None else -9, out, err, proc.pid, timed_out)
