"""The README's code examples run as written (so they cannot rot)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def example(name: str) -> str:
    text = open(README).read()
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, flags=re.S)
    assert match, f"README.md has no example {name!r}"
    return match.group(1)


@pytest.mark.parametrize("name", ["own-loop", "trainer"])
def test_readme_example_runs(name):
    exec(compile(example(name), f"README.md:{name}", "exec"), {"__name__": f"readme_{name}"})
