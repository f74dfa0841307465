"""The README's examples and commands run as written."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)
COMMANDS = [line.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines() if line.strip()]
# What .ci/run runs, as written: the install and the full test suite (this test must not start it again).
CI_SCRIPT = (ROOT / ".ci" / "run").read_text()
CI_COMMANDS = [command for command in COMMANDS if command in CI_SCRIPT]


def test_readme_has_examples_and_commands():
    assert len(EXAMPLES) >= 2
    assert "python -m pytest tests -q" in CI_COMMANDS
    assert any(command.startswith("pip install torch==2.13.0") for command in CI_COMMANDS)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code, capsys):
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    # The examples print their own checks: something, and no failed one.
    assert printed.strip() and "False" not in printed, printed


def _as_run_here(command: str) -> str:
    """pip installs resolve without installing (``--dry-run``): the environment this
    test runs in must not change; everything else runs unchanged."""
    parts = [part.strip() for part in command.split("&&")]
    return " && ".join(f"{part} --dry-run" if part.startswith("pip install") else part for part in parts)


# The test commands are this suite itself: CI runs the whole of it.
@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in CI_COMMANDS and not c.startswith("python -m pytest tests")], ids=lambda c: c[:60])
def test_readme_command_runs(command):
    environment = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = _as_run_here(command).replace("python -m", f"{shlex.quote(sys.executable)} -m")
    result = subprocess.run(run, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def test_readme_speaks_to_users():
    for word in ("issue", "session", "target"):
        assert not re.search(rf"\b{word}s?\b", README, re.I), f"the README talks about the project's {word}s"
    assert len(README.splitlines()) <= 250
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
