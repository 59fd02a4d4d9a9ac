"""The README's two set-up commands exist and CI runs the second one verbatim."""

import re

from conftest import REPO


def _commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block, "README.md must open with a bash block holding the two set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_two_commands():
    readme = (REPO / "README.md").read_text()
    assert readme.index("```bash") < 40, "the commands must be the README's first lines"
    install, test = _commands()
    assert "attncc analyze examples/specs/" in install
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    test = _commands()[1]
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines
