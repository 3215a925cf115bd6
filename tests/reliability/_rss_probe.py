"""Runs a CLI script in this process while sampling its resident memory against its progress.

    python -m tests.reliability._rss_probe MODULE:FUNC ARG -- SCRIPT.py [args...]

MODULE:FUNC is wrapped to count progress: each call adds len(positional argument ARG), or 1 when ARG is -1. RSS is
this process's plus its live child processes' (data loader workers, pool workers). Prints one JSON line:
{"exit": code, "samples": [[progress, rss_kb], ...], "peak_kb": largest sampled RSS, "progress": total}.
"""
import importlib
import json
import os
import runpy
import sys
import threading


def _process_rss_kb(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:  # exited meanwhile
        pass
    return 0


def _rss_kb() -> int:
    """This process and its children (found through /proc/self/task/*/children)."""
    children = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(f.read().split())
        except OSError:
            pass
    return _process_rss_kb("self") + sum(_process_rss_kb(pid) for pid in children)


def main() -> None:
    target, arg = sys.argv[1], int(sys.argv[2])
    split = sys.argv.index("--")
    script, args = sys.argv[split + 1], sys.argv[split + 2:]
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, func_name)
    progress = [0]

    def counted(*a, **kw):
        progress[0] += 1 if arg < 0 else len(a[arg])
        return real(*a, **kw)

    setattr(module, func_name, counted)
    samples = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            samples.append([progress[0], _rss_kb()])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sys.argv = [script] + args
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    done.set()
    sampler.join()
    samples.append([progress[0], _rss_kb()])
    print(json.dumps({"exit": code, "samples": samples, "progress": progress[0],
                      "peak_kb": max(rss for _, rss in samples)}))


if __name__ == "__main__":
    main()
