"""The documentation promises only what the project has.

Every `python SCRIPT ...` and `torchrun ... SCRIPT ...` command shown in README.md,
README.ko.md and docs/*.md (in ```bash blocks and in inline code) names a script that
exists, and each of its --flags is one the script's own --help lists: the commands that
need hardware or a network are checked here, the offline ones are also run by
tests/test_readme.py. Every link to a page or a heading leads somewhere, every `file.py`
and `file.py:name` named in the text exists, and README.md stays short."""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "README.ko.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LINES = 250
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def text(page):
    return page.read_text(encoding="utf-8")


def prose(page):
    """The page without its fenced blocks (whose lines stay, emptied, so line numbers hold)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text(page))


def line_of(source, offset):
    return source.count("\n", 0, offset) + 1


def shell_lines(page):
    """(line, command) for every command line of the page's ```bash blocks (continuations
    joined) and every inline code span that starts like a command."""
    source = text(page)
    for match in FENCE.finditer(source):
        if match.group(1) != "bash":
            continue
        first = line_of(source, match.start(2))
        body = match.group(2)
        # Join continuation lines, remembering where each command starts.
        start, pending = None, ""
        for i, line in enumerate(body.splitlines()):
            start = first + i if not pending else start
            pending += line[:-1] + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                if pending.strip() and not pending.lstrip().startswith("#"):
                    yield start, pending.strip()
                pending = ""
    for match in re.finditer(r"`([^`\n]+)`", prose(page)):
        span = match.group(1)
        if re.match(r"(\w+=\S+ )*(python3? |torchrun )", span):
            yield line_of(source, match.start()), span


def invocations(words):
    """(launcher options, script, arguments) for each Python script the words run:
    `python SCRIPT ARGS`, `python -m torch.distributed.run ...`, `torchrun [OPTS] SCRIPT
    ARGS`, and commands quoted inside others (say `gcloud ... --command "python ..."`)."""
    for part in _split_on_operators(words):
        while part and re.match(r"^\w+=", part[0]):  # VAR=value before the command
            part = part[1:]
        if not part:
            continue
        if part[0] in ("python", "python3") and part[1:2] == ["-m"]:
            if part[2:3] == ["torch.distributed.run"]:
                yield from _torchrun(part[3:])
        elif part[0] in ("python", "python3") and len(part) > 1:
            yield [], part[1], part[2:]
        elif part[0] == "torchrun":
            yield from _torchrun(part[1:])
        for word in part[1:]:  # a command quoted in another
            if re.match(r"(python3?|torchrun) ", word):
                yield from invocations(shlex.split(word, comments=True))


def _split_on_operators(words):
    part = []
    for word in words:
        if word in ("&&", "||", ";", "|"):
            yield part
            part = []
        else:
            part.append(word)
    yield part


def _torchrun(words):
    for i, word in enumerate(words):
        if word.endswith(".py"):
            yield ["torchrun", *words[:i]], word, words[i + 1:]
            return
    yield ["torchrun", *words], None, []  # the launcher named alone


def commands():
    found = []
    for page in PAGES:
        if page.is_file():
            for line, command in shell_lines(page):
                for launcher, script, args in invocations(shlex.split(command, comments=True)):
                    found.append(pytest.param(launcher, script, args,
                                              id=f"{page.relative_to(ROOT)}:{line}"))
    return found


@functools.lru_cache(maxsize=None)
def flags_of(*command):
    """The --flags a command's --help lists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (f"`python {' '.join(command)} --help` failed:\n"
                                    f"{result.stderr[-3000:]}")
    return set(re.findall(r"--[A-Za-z0-9][\w-]*", result.stdout))


def flags(words):
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2]


@pytest.mark.parametrize("launcher, script, args", commands())
def test_a_documented_command_names_a_real_script_and_real_flags(launcher, script, args):
    assert script or launcher
    if script:
        assert not os.path.isabs(script) and (ROOT / script).is_file(), f"no script {script}"
    if flags(args):
        unknown = sorted(set(flags(args)) - flags_of(script))
        assert not unknown, f"{script} has no {', '.join(unknown)}"
    if launcher:
        unknown = sorted(set(flags(launcher[1:])) - flags_of("-m", "torch.distributed.run"))
        assert not unknown, f"torchrun has no {', '.join(unknown)}"


def test_the_commands_are_found():
    """The search above sees the commands the README shows (it is not silently empty)."""
    scripts = {script for p in commands() for script in [p.values[1]]}
    assert {"train.py", "generate.py", "tests/fixtures.py"} <= scripts
    assert any(p.values[0] for p in commands()), "no torchrun command found"


def test_readme_is_short():
    lines = text(ROOT / "README.md").count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines, more than {README_LINES}"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    seen, result = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), re.M):
        base = slug(heading)
        result.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return result


def links(page):
    return [(line_of(prose(page), m.start()), m.group(1))
            for m in re.finditer(r"\]\(([^)\s]+)\)", prose(page))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    for line, target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        assert linked.exists(), f"{where}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{where}: no such heading"


def test_every_docs_page_is_linked_from_the_readme():
    readme = text(ROOT / "README.md")
    linked = {(ROOT / target.partition("#")[0]).resolve()
              for _, target in links(ROOT / "README.md") if target.startswith("docs/")}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert page.resolve() in linked, f"README.md links to no {page.relative_to(ROOT)}"
    assert "](docs/" in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_and_function_named_exists(page):
    """`path.py` and `path.py:name` (or `path.py:Class.method`) in the text are real: the
    file is in the project and defines each name."""
    for match in re.finditer(r"`([\w/.-]+\.py)(?::([\w.]+))?`", prose(page)):
        path, names = match.group(1), match.group(2)
        where = f"{page.relative_to(ROOT)}:{line_of(prose(page), match.start())}"
        assert (ROOT / path).is_file(), f"{where}: no file {path}"
        source = (ROOT / path).read_text(encoding="utf-8")
        for name in (names or "").split(".") if names else []:
            assert re.search(rf"^\s*(def|class)\s+{name}\b|^{name}\s*=", source, re.M), (
                f"{where}: {path} defines no {name}")


def test_the_cpu_only_install_matches_the_requirements():
    """The CPU-only note installs the very torch version the requirements pin."""
    pinned = re.search(r"^torch==(\S+)", text(ROOT / "requirements.txt"), re.M).group(1)
    for page in ["README.md", "README.ko.md"]:
        assert f"pip install torch=={pinned} --index-url" in text(ROOT / page), page


def test_each_test_worker_runs_torch_on_one_thread():
    """docs/testing.md: pytest.ini runs two tests at a time, and tests/conftest.py gives
    each worker one torch thread (inherited by the processes its tests start), unless
    OMP_NUM_THREADS is set already."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("one test at a time (-n 0): torch keeps a thread per core")
    import torch
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
