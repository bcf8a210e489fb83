"""The README's code examples run as written (so they cannot rot); the generated performance
parts of README.md and docs/performance.md are those of the committed result files; every
relative link of the documents resolves."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOCUMENTS = [README, *(os.path.join(DOCS, name) for name in sorted(os.listdir(DOCS)) if name.endswith(".md")),
             os.path.join(ROOT, "csrc", "README.md"), os.path.join(ROOT, "experiments", "README.md")]


def example(name: str) -> str:
    text = open(README).read()
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, flags=re.S)
    assert match, f"README.md has no example {name!r}"
    return match.group(1)


@pytest.mark.parametrize("name", ["loss", "own-loop", "trainer", "models"])
def test_readme_example_runs(name):
    exec(compile(example(name), f"README.md:{name}", "exec"), {"__name__": f"readme_{name}"})


def test_generated_performance_parts_are_current():
    """`python benchmarks/report.py` (make docs) has been run since the result files changed."""
    from jacfast.bench import report

    doc = os.path.join(DOCS, "performance.md")
    hint = "stale: run `python benchmarks/report.py` (make docs)"
    assert report.summary_section(RESULTS, ROOT) in open(README).read(), f"README.md's performance summary is {hint}"
    assert report.performance_section(RESULTS, DOCS) in open(doc).read(), f"docs/performance.md's tables are {hint}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    text = open(path).read()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    missing = [link for link in local if link and not os.path.exists(os.path.join(os.path.dirname(path), link))]
    assert not missing, f"{os.path.relpath(path, ROOT)} links to missing files: {missing}"
    if path == README:  # the summary shows its plot, and the README points to the details
        assert local and "docs/performance.md" in local and "docs/design.md" in local


def test_readme_stays_a_front_door():
    """About 250 lines: tables and notes beyond the summary go to docs/."""
    lines = open(README).read().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines"
    assert "<!-- performance:begin -->" not in "\n".join(lines)  # the full tables live in docs/performance.md
