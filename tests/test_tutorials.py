"""Every tutorial's Python blocks, and the README's, run as written, in order, in a fresh folder and process
(no download), and print what the page says they print."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md")) + [ROOT / "README.md"]

RUN_BLOCKS = """
import re, sys
page = sys.argv[1]
blocks = re.findall(r"```python\\n(.*?)```", open(page, encoding="utf-8").read(), re.S)
namespace = {"__name__": "__main__"}
for number, block in enumerate(blocks):
    exec(compile(block, f"{page} block {number}", "exec"), namespace)
"""


def test_every_tutorial_has_python_to_run():
    pages = {page.stem: re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
             for page in TUTORIALS}
    assert len(pages) >= 9 and all(pages.values())


def printed_lines(page: Path) -> list[str]:
    """What the page says its prints write: the ``# ...`` lines right below a ``print(`` line."""
    expected = []
    for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
        lines = block.splitlines()
        for number, line in enumerate(lines):
            if "print(" in line:
                for comment in lines[number + 1:]:
                    if not comment.startswith("# "):
                        break
                    expected.append(comment[2:])
    return expected


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda page: page.stem)
def test_the_tutorial_runs_as_written(page, tmp_path):
    # A process of its own: tutorials register components, which must not leak into other tests.
    done = subprocess.run([sys.executable, "-c", RUN_BLOCKS, str(page)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{page.name} failed:\n{done.stderr[-4000:]}"
    written = iter(line.rstrip() for line in done.stdout.splitlines())
    for line in printed_lines(page):  # in order, each after the one before
        assert any(output == line for output in written), f"{page.name} no longer prints {line!r}:\n{done.stdout}"
