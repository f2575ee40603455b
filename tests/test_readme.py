"""The README's first-run commands, run as written from a fresh copy of the project, with a
fresh home directory: only the model and the corpus paths are swapped for the tiny
fixtures. A README command that breaks fails here."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
# The README's own paths, and what the test puts in their place.
MODEL, CORPUS_ROOT = "../shared/models/kogpt2-standin", "../shared/data"


def readme_block(name):
    """The commands of the ```bash block that follows `<!-- tested: name -->`, one a line,
    continuation lines joined."""
    match = re.search(rf"<!-- tested: {name} -->\s*```bash\n(.*?)```", README, re.S)
    assert match, f"README.md has no block marked <!-- tested: {name} -->"
    text = match.group(1).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def fresh_clone(tmp_path):
    """The project's files as a clone has them, without caches or earlier runs."""
    clone = tmp_path / "kogpt2-nsmc"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    return clone


def run_readme(commands, clone, home, paths):
    """Run each command in `clone` (`python` is this interpreter); returns their outputs."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "XDG_CACHE_HOME", "PJRT_DEVICE")}
    env["HOME"] = str(home)
    outputs = []
    for command in commands:
        for readme_path, here in paths.items():
            command = command.replace(readme_path, str(here))
        words = shlex.split(command)
        settings = {}
        while "=" in words[0]:  # VAR=value before the command
            key, value = words.pop(0).split("=", 1)
            settings[key] = value
        assert words[0] == "python", command
        result = subprocess.run([sys.executable, *words[1:]], cwd=clone,
                                env={**env, **settings}, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr and "PJRT_DEVICE" not in result.stderr, command
        outputs.append(result)
    return outputs


@pytest.fixture
def clone_and_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return fresh_clone(tmp_path), home


def test_first_run_as_written(tiny_model, corpus, clone_and_home):
    clone, home = clone_and_home
    commands = readme_block("first-run")
    train, write, evaluate = run_readme(commands, clone, home,
                                        {MODEL: tiny_model, CORPUS_ROOT: corpus})
    assert train.stdout.count("device:") == 1
    out = clone / "checkpoint-generation"
    assert (out / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    reviews = write.stdout.splitlines()
    assert len(reviews) == 2 * int(commands[1].split("--num_samples")[1].split()[0])
    assert evaluate.stdout.startswith("polarity accuracy: ")
    # The corpus was where the README said: nothing went to ~/Korpora, the cache to ~/.cache.
    assert sorted(p.name for p in home.iterdir()) == [".cache"]


def test_stand_in_built_from_the_corpus_as_written(corpus, clone_and_home):
    clone, home = clone_and_home
    build, train = run_readme(readme_block("tiny-stand-in"), clone, home, {CORPUS_ROOT: corpus})
    assert "done: best val_loss" in train.stdout
    assert not (home / "Korpora").exists()


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


def test_the_curves_picture_is_drawn_from_metrics_jsonl(tmp_path):
    """docs/plot_metrics.py draws the README's picture: one line per curve, from the events."""
    import json
    import xml.dom.minidom
    events = [{"event": "eval", "step": 0, "val_loss": 6.0, "polarity_accuracy": 0.5}]
    events += [{"event": "train", "step": s, "loss": 6 - s / 100} for s in range(10, 110, 10)]
    events += [{"event": "eval", "step": 100, "val_loss": 5.5, "polarity_accuracy": 0.6}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "docs" / "plot_metrics.py"), str(metrics),
                    str(tmp_path / "curves.svg")], check=True, timeout=60)
    lines = xml.dom.minidom.parse(str(tmp_path / "curves.svg")).getElementsByTagName("polyline")
    assert [len(line.getAttribute("points").split()) for line in lines] == [10, 2, 2]
    assert "](docs/first-run.svg)" in README and (ROOT / "docs" / "first-run.svg").is_file()
