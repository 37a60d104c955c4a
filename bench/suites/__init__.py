"""Benchmark suites. Each module exposes `cases(cfg) -> list[harness.Case]`."""
