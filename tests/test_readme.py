"""The READMEs' commands, run as written.

Every block marked `<!-- tested: NAME -->` in README.md and README.ko.md is run the way a
reader runs it: line by line by bash, in a fresh copy of the project, with an empty home
directory, `python` being this interpreter. Only the `local-copy` block's two example paths
(one machine's copies of a model and of NSMC) are swapped for the test's fixtures. These
train and use models, so they are in the slow tier (`-m slow`). README.ko.md's blocks are
checked in the fast tier to be these very commands, so each block runs once, from README.md.
A README command that breaks fails here."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import fixtures
import pytest
from conftest import ROOT

READMES = ["README.md", "README.ko.md"]
RUN = ["README.md"]  # README.ko.md holds the same commands (test_the_two_readmes_hold_...)
TESTED = ["first-run", "local-copy", "resume", "own-corpus"]  # each has a test below
# The local-copy block's example paths, and the fixtures the test puts in their place.
MODEL, CORPUS_ROOT = "../shared/models/kogpt2-standin", "../shared/data"


def readme(name):
    return (ROOT / name).read_text(encoding="utf-8")


def lines_of(block):
    """A shell block's command lines, continuation lines joined, blank and comment lines
    dropped (a comment after a command stays: bash skips it)."""
    text = block.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def marked_blocks(text):
    """{NAME: the commands of the ```bash block after `<!-- tested: NAME -->`}."""
    return {name: lines_of(block) for name, block in
            re.findall(r"<!-- tested: (\S+) -->\s*```bash\n(.*?)```", text, re.S)}


def block(readme_name, name):
    blocks = marked_blocks(readme(readme_name))
    assert name in blocks, f"{readme_name} has no block marked <!-- tested: {name} -->"
    return blocks[name]


def shell_words(text):
    """Every ```bash block's commands as words, comments dropped: what the shell runs."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [shlex.split(line, comments=True) for b in blocks for line in lines_of(b)]


def fresh_clone(tmp_path):
    """The project's files as a clone has them (those git knows), without caches or earlier
    runs; Python files not yet added to git come too, so a module being written is tested
    before its commit."""
    clone = tmp_path / "kogpt2-nsmc"
    git = ["git", "ls-files", "-z"]
    known = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    new = subprocess.run([*git, "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    names = known.split("\0") + [n for n in new.split("\0") if n.endswith(".py")]
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            (clone / name).write_bytes(source.read_bytes())
    return clone


class Reader:
    """Someone at a shell in a fresh clone, with an empty home directory."""

    def __init__(self, tmp_path):
        self.clone = fresh_clone(tmp_path)
        self.home = tmp_path / "home"
        self.home.mkdir()
        bin_dir = tmp_path / "bin"  # `python` is this interpreter, as in an activated venv
        bin_dir.mkdir()
        (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / "python").chmod(0o755)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("HF_HUB_OFFLINE", "XDG_CACHE_HOME", "PJRT_DEVICE")}
        self.env.update(HOME=str(self.home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def start(self, command):
        return subprocess.Popen(["bash", "-c", command], cwd=self.clone, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def finish(self, process, command, codes=(0,), timeout=600):
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{command}\ndid not finish in {timeout} s:\n{stdout}\n{stderr}")
        assert process.returncode in codes, f"{command}\n{stdout}\n{stderr}"
        assert "Traceback" not in stderr and "PJRT_DEVICE" not in stderr, f"{command}\n{stderr}"
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def run(self, command, **kwargs):
        return self.finish(self.start(command), command, **kwargs)


@pytest.fixture
def reader(tmp_path):
    return Reader(tmp_path)


def metrics(out_dir, event):
    lines = (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN)
def test_first_run_as_written(name, reader):
    commands = block(name, "first-run")
    write_corpus, build, train, write, evaluate = [reader.run(c) for c in commands]
    clone = reader.clone
    assert (clone / "sample-data" / "nsmc" / "ratings_train.txt").is_file()
    assert (clone / "sample-data" / "nsmc" / "ratings_test.txt").is_file()
    assert (clone / "tiny-kogpt2" / "tokenizer.json").is_file()
    assert train.stdout.count("device:") == 1 and "done: best val_loss" in train.stdout
    out = clone / "checkpoint-generation"
    assert (out / "model.safetensors").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # The README: polarity accuracy climbs from a coin's 0.5 to near 1.
    evals = metrics(out, "eval")
    assert evals[0]["step"] == 0 and evals[0]["polarity_accuracy"] < 0.75, evals[0]
    assert evals[-1]["polarity_accuracy"] >= 0.9, evals[-1]
    samples = int(commands[3].split("--num_samples")[1].split()[0])
    assert len(write.stdout.splitlines()) == 2 * samples, write.stdout
    assert evaluate.stdout.startswith("polarity accuracy: ")
    assert "control accuracy: " in evaluate.stdout
    # Nothing went to ~/Korpora: the corpus was where the commands said; the cache in ~/.cache.
    assert sorted(p.name for p in reader.home.iterdir()) == [".cache"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN)
def test_local_copy_as_written(name, reader, tiny_model, corpus):
    commands = [c.replace(MODEL, str(tiny_model)).replace(CORPUS_ROOT, str(corpus))
                for c in block(name, "local-copy")]
    assert all(MODEL not in c and CORPUS_ROOT not in c for c in commands)
    train, write, evaluate = [reader.run(c) for c in commands]
    assert "done: best val_loss" in train.stdout
    assert (reader.clone / "local-run" / "model.safetensors").is_file()
    samples = int(commands[1].split("--num_samples")[1].split()[0])
    assert len(write.stdout.splitlines()) == 2 * samples, write.stdout
    assert evaluate.stdout.startswith("polarity accuracy: ")
    assert not (reader.home / "Korpora").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN)
def test_stop_and_resume_as_written(name, reader):
    for command in block(name, "first-run")[:2]:  # the sample corpus and the stand-in
        reader.run(command)
    first, resume = block(name, "resume")
    out = reader.clone / "resumable"
    process = reader.start(first)
    # Ctrl-C (SIGINT to the foreground process group) once a checkpoint is complete.
    while process.poll() is None and not [p for p in out.glob("checkpoint-*")
                                          if not p.name.endswith(".tmp")]:
        time.sleep(0.1)
    try:
        os.killpg(process.pid, signal.SIGINT)
    except ProcessLookupError:  # it had finished: resuming a finished run must work too
        pass
    stopped = reader.finish(process, first, codes=(0, 130))
    if stopped.returncode == 130:  # it says how to continue
        assert "--resume latest" in stopped.stderr + stopped.stdout, stopped.stderr
    resumed = reader.run(resume)
    assert "done: best val_loss" in resumed.stdout
    steps = [e["step"] for e in metrics(out, "eval")]
    assert steps == sorted(steps) and steps[0] == 0, steps


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN)
def test_own_corpus_as_written(name, reader):
    for command in block(name, "first-run")[:2]:  # the sample corpus and the stand-in
        reader.run(command)
    # The reader's own files, in the layouts the README names: a header, and none.
    reviews = fixtures.make_reviews(96, seed=5)
    (reader.clone / "my_train.tsv").write_text(
        "document\tlabel\n" + "".join(f"{d}\t{y}\n" for d, y in reviews[:64]), encoding="utf-8")
    (reader.clone / "my_val.tsv").write_text(
        "".join(f"{d}\t{y}\n" for d, y in reviews[64:]), encoding="utf-8")
    train, write, evaluate = [reader.run(c) for c in block(name, "own-corpus")]
    assert "done: best val_loss" in train.stdout
    assert (reader.clone / "my-run" / "model.safetensors").is_file()
    assert len(write.stdout.splitlines()) == 5  # the default --num_samples, one polarity
    assert evaluate.stdout.startswith("polarity accuracy: ")


def test_every_tested_block_is_run():
    for name in READMES:
        assert sorted(marked_blocks(readme(name))) == sorted(TESTED), name


def test_the_two_readmes_hold_the_same_commands():
    """README.ko.md is README.md in Korean: the same commands, in the same order, and the
    same tested blocks (comments may be translated)."""
    english, korean = readme("README.md"), readme("README.ko.md")
    assert shell_words(korean) == shell_words(english)
    assert ([(n, [shlex.split(c, comments=True) for c in cs])
             for n, cs in marked_blocks(korean).items()] ==
            [(n, [shlex.split(c, comments=True) for c in cs])
             for n, cs in marked_blocks(english).items()])


@pytest.mark.slow
def test_help_is_answered_before_torch_loads():
    """--help parses the arguments before the heavy imports (a fast answer is the point;
    what is checked is that torch is never imported for it)."""
    for script in ["train.py", "generate.py"]:
        code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
                f"try: runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
                f"except SystemExit: print('torch' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.stdout.strip().endswith("False"), (script, result.stdout, result.stderr)
        assert "--downstream_model_dir" in result.stdout


@pytest.mark.slow
def test_the_curves_picture_is_drawn_from_metrics_jsonl(tmp_path):
    """docs/plot_metrics.py draws the README's picture: one line per curve, from the events."""
    import xml.dom.minidom
    events = [{"event": "eval", "step": 0, "val_loss": 6.0, "polarity_accuracy": 0.5}]
    events += [{"event": "train", "step": s, "loss": 6 - s / 100} for s in range(10, 110, 10)]
    events += [{"event": "eval", "step": 100, "val_loss": 5.5, "polarity_accuracy": 0.6}]
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "docs" / "plot_metrics.py"), str(metrics_file),
                    str(tmp_path / "curves.svg")], check=True, timeout=60)
    lines = xml.dom.minidom.parse(str(tmp_path / "curves.svg")).getElementsByTagName("polyline")
    assert [len(line.getAttribute("points").split()) for line in lines] == [10, 2, 2]
    assert (ROOT / "docs" / "first-run.svg").is_file()
    for name in READMES:
        assert "](docs/first-run.svg)" in readme(name), name
