"""Benchmark runner: ``python -m quintet.bench [SUITE ...]`` (also ``quintet bench``).

Suites ship in the package (``quintet/benchmarks/bench_<name>.py``; $QUINTET_BENCHMARKS may name a
folder of extra suites); each exposes
``run(quick: bool = False) -> dict`` whose values are JSON-ready and whose ``ratios`` entry holds the
numbers an issue targets. Everything a suite compares is measured side by side in one process.
Results go to ``bench-results/<name>.json``; a table of every suite's ratios is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as torch_benchmark

from quintet.training.flops import count_flops, matmul_flops_per_s  # noqa: F401 (suites use them from here)


def suite_dirs() -> list[Path]:
    """Folders holding ``bench_<suite>.py`` files: the package's suites, then $QUINTET_BENCHMARKS (extra suites)."""
    import quintet.benchmarks

    folders = [Path(quintet.benchmarks.__file__).parent]
    extra = os.environ.get("QUINTET_BENCHMARKS")
    if extra:
        folders.append(Path(extra))
    return folders


def _suite_files() -> dict[str, Path]:
    """Suite name -> file; a suite in $QUINTET_BENCHMARKS replaces the package's suite of that name."""
    return {p.stem.removeprefix("bench_"): p for folder in suite_dirs() for p in sorted(folder.glob("bench_*.py"))}


def available_suites() -> list[str]:
    return sorted(_suite_files())


def _load_suite(name: str):
    files = _suite_files()
    if name not in files:
        raise ValueError(f"suite: unknown benchmark suite {name!r}; available: {', '.join(sorted(files))}")
    spec = importlib.util.spec_from_file_location(f"quintet_bench_{name}", files[name])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a suite look their module up while it executes
    spec.loader.exec_module(module)
    return module


def time_fn(fn: Callable[[], Any], *, min_run_time: float = 1.0) -> float:
    """Median seconds per call of ``fn`` (torch.utils.benchmark, after a warm-up call)."""
    fn()
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the resident baseline holds live data only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any]) -> int | None:
    """Peak bytes of memory that one call of ``fn`` adds (CUDA allocator, or CPU resident set).

    On CPU this resets the kernel's resident high-water mark (``/proc/self/clear_refs``) and reads
    it back after the call; large tensors are mmapped by the allocator and returned on free, so the
    peak tracks tensor memory. Returns None where neither is measurable.
    """
    gc.collect()
    _release_free_heap()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        base = _proc_status_bytes("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _proc_status_bytes("VmHWM") - base)


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    rows = [(suite, key, _fmt(value)) for suite, r in results.items() for key, value in r.get("ratios", {}).items()]
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows + [("suite", "ratio", "value")]) for i in range(3)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format("suite", "ratio", "value"))
    for row in rows:
        print(line.format(*row))


def run_suites(names: Sequence[str] = (), *, quick: bool = False, out_dir: str | os.PathLike = "bench-results"):
    names = list(names) or available_suites()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        suite = _load_suite(name)
        print(f"[bench] {name} ...", flush=True)
        result = {"suite": name, "quick": quick, "environment": environment(), **suite.run(quick=quick)}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] wrote {out / f'{name}.json'}", flush=True)
        results[name] = result
    print_table(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quintet.bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help="suites to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON results")
    args = parser.parse_args(argv)
    try:
        run_suites(args.suites, quick=args.quick, out_dir=args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
