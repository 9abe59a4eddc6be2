"""Print the set-up commands of the README's first code block, one a line, comments cut.

CI runs exactly these lines, and tests/behaviour/test_packaging.py reads them through this
script too, so the README cannot drift from what is tested. Standard library only:
it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands(text: str) -> list[str]:
    """The non-blank lines of the first fenced block, each without its trailing `# comment`."""
    match = re.search(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    if match is None:
        raise SystemExit(f"{README}: no code block")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in match.group(1).splitlines() if line.strip()]


if __name__ == "__main__":
    for command in readme_commands(README.read_text(encoding="utf-8")):
        print(command)
    sys.exit(0)
