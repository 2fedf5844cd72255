"""Serving benchmarks (docs/design.md §8): workloads, the arms that serve them, metrics and reports.

``run_serve`` (ember.bench.runner) runs every arm on one workload and one loaded model;
``ember bench serve`` and ``benchmarks/serve.py`` are thin layers over it.
"""
