"""The examples run end to end (each checks its own results and exits non-zero on failure)."""

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_srigl_digits():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "srigl_digits.py")], capture_output=True, text=True, timeout=300, cwd=EXAMPLES
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    for line in ("test accuracy: dense", "same predictions True", "condense: converted", "inference time",
                 "final masks agree on", "reloaded model predicts the same: True"):
        assert line in result.stdout, result.stdout
