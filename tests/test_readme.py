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


def test_every_package_is_installed():
    """The README's `pip install .` (not editable, as CI runs it) ships every package of the source
    tree: pyproject.toml lists them by hand, and a package left out imports only from a checkout."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: REPO / folder for name, folder in setuptools["package-dir"].items()}
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((name, *parts)))
    assert found <= set(setuptools["packages"]), sorted(found - set(setuptools["packages"]))
