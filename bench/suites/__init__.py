"""Benchmark suites, one module each, all with the same small interface:

    NAME = "softmax"
    missing() -> str | None          # why the suite cannot run here (an API is absent), or None
    specs(cfg) -> list[harness.Spec] # cheap row descriptions for cfg.mode in tiny/quick/full
    build(spec) -> harness.Case      # allocate the inputs and contenders of one row

The runner filters specs (--shape, --dtype), counts them for the progress bar, and builds
one case at a time so only one row's arrays are alive.
"""

ORDER = ["softmax", "matmul", "attention", "decode", "backward", "hf"]
# Suites that run only when named with --suite: cp launches W local processes per row group.
OPTIONAL = ["cp"]
