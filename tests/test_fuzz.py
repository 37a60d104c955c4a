"""Runs the hypothesis fuzz suite (tests/fuzz/fuzz_api.py) in a subprocess, so a crash (a
segfault, an abort) fails this test with its output instead of taking pytest down.

CI runs 100 derandomized examples per property (7 properties: 700 cases). A nightly-style run: ATTNKIT_FUZZ_EXAMPLES=2000 ATTNKIT_FUZZ_SEED=$RANDOM
python -m pytest tests/test_fuzz.py (a new seed explores new cases; the seed reproduces them)."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_fuzz_suite_in_subprocess():
    env = dict(os.environ)
    env.setdefault("ATTNKIT_FUZZ_EXAMPLES", "100")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         os.path.join(HERE, "fuzz", "fuzz_api.py")],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    assert r.returncode == 0, f"fuzz run failed (rc={r.returncode}):\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    assert "passed" in r.stdout
