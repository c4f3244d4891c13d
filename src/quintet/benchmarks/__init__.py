"""The benchmark suites ``quintet bench`` runs: ``bench_<suite>.py``, each with ``run(quick) -> dict``.

They ship inside the package, so an installed wheel benchmarks itself; the runner is :mod:`quintet.bench`.
"""
