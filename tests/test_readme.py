"""The README's test command is what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_test_command_is_ci():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                  if line.startswith("python3 -m venv")]
    assert len(ci_command) == 1
    assert f"\n{ci_command[0]}\n" in (ROOT / "README.md").read_text()


def test_ci_installs_chromium_before_the_tests():
    """The browser tests (tests/test_web.py) fail under CI without the Debian chromium."""
    ci = (ROOT / ".ci/run").read_text()
    assert "apt-get install -y -qq chromium" in ci
    assert ci.index("apt-get install") < ci.index("\npython3 -m venv")
