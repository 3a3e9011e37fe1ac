"""The repository explains itself: the README's quickstart commands are the ones CI runs, every
local link in the README and docs/ points to a file that exists, and nothing points outside the
repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_commands():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert "-m confusion_kernels demo" in commands[0] and "pytest tests" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci, f".ci/run does not run the README's command {command!r}"


def test_local_links_exist():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_nothing_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared|SPEC\.md|SPEC section")
    for path in [*DOCS, *ROOT.glob("confusion_kernels/**/*.py"), *ROOT.glob("csrc/**/*.*"),
                 *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py"),
                 *ROOT.glob("examples/*.py")]:
        if path.suffix in (".so", ".o") or path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        assert not pattern.search(text), f"{path.relative_to(ROOT)} points outside the repository"
