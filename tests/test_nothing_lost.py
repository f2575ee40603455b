"""Nothing lost, round two: kills that leave half a line or half a file behind, damaged
checkpoints, full disks at every write, a best model that always loads, no non-finite
weights saved, every flag checked, and changed arguments on resume that mean what they say."""
import errno
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_train
from safetensors import SafetensorError
from transformers import GPT2LMHeadModel

import runtime.backends
import runtime.checkpoint
import runtime.rundir
import train
from model import load_model, load_tokenizer
from runtime.errors import InputError

SAVED = ["--max_steps", "6", "--save_every_steps", "2", "--keep_checkpoints", "3"]


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A finished 6-step CPU run with checkpoints at steps 2, 4 and 6; tests copy it."""
    import fixtures
    root = tmp_path_factory.mktemp("finished")
    corpus = fixtures.write_corpus(root / "corpus")
    args = ["--pretrained_model_name", str(tiny_model), "--downstream_corpus_root_dir",
            str(corpus), "--downstream_model_dir", str(root / "out"), "--cache_dir",
            str(root / "cache"), "--batch_size", "16", "--learning_rate", "1e-3",
            "--log_every", "1", "--device", "cpu", *SAVED]
    assert train.main(args) == 0
    return root, args


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, and its arguments pointing at the copy."""
    root, args = finished
    shutil.copytree(root, tmp_path / "run")
    return tmp_path / "run" / "out", [a.replace(str(root), str(tmp_path / "run")) for a in args]


# --------------------------------------------------------------------------- resume after any kill

@pytest.mark.slow
def test_a_half_written_last_line_of_metrics_does_not_stop_a_resume(run, capsys):
    out, args = run
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"event": "train", "lo')                       # what a kill -9 leaves
    shutil.rmtree(out / "checkpoint-6")
    assert train.main(args + ["--resume", "latest"]) == 0
    steps = [e["step"] for e in read_metrics(out, "train")]
    assert steps == [1, 2, 3, 4, 5, 6]                           # parsed, no step twice


@pytest.mark.slow
def test_a_fresh_run_owns_its_log(run, capsys):
    """A run killed before its first checkpoint leaves events; the next run starts over."""
    out, args = run
    for path in out.glob("checkpoint-*"):
        shutil.rmtree(path)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"event": "train", "step": 99, "lo')
    assert train.main([*args, "--resume", "latest"]) == 0      # no checkpoint: from the start
    events = read_metrics(out)
    assert events[0]["event"] == "eval" and events[0]["step"] == 0
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_fresh_run_over_an_earlier_run_is_refused_unless_asked_to_replace_it(run, capsys):
    out, args = run
    assert train.main(args + ["--max_steps", "2"]) == 1
    assert error_line(capsys) == (
        f"error: --downstream_model_dir {out} holds an earlier run (checkpoint-6); continue "
        f"it with --resume latest, pass --overwrite_output_dir to replace it, or choose "
        f"another directory")
    assert runtime.rundir.latest_checkpoint(out).name == "checkpoint-6"   # nothing touched

    new = args + ["--max_steps", "4", "--save_every_steps", "2", "--overwrite_output_dir"]
    assert train.main(new) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [e["step"] for e in read_metrics(out, "eval")] == [0, 4]
    assert GPT2LMHeadModel.from_pretrained(out) is not None


def with_flag(args, flag, value):
    """`args` with `flag` set to `value`."""
    i = args.index(flag)
    return args[:i + 1] + [str(value)] + args[i + 2:]


@pytest.mark.slow
def test_a_resume_from_another_folder_never_deletes_the_run_kept_here(run, tmp_path, capsys):
    """Continued in a folder that holds another run, the run resumed would delete that
    run's later checkpoints (going back) and its best model (exporting its own)."""
    out, args = run
    here = Path(shutil.copytree(out, tmp_path / "here"))          # another run
    kept = files(here / "checkpoint-6"), files(here)
    args = with_flag(args, "--downstream_model_dir", here) + [
        "--resume", str(out / "checkpoint-4"), "--polarity_eval_size", "0"]  # 0: quicker
    assert train.main(args) == 1
    assert error_line(capsys) == (
        f"error: --downstream_model_dir {here} holds another run (checkpoint-6) than the one "
        f"--resume {out / 'checkpoint-4'} continues, and resuming would delete its "
        f"checkpoints; choose another --downstream_model_dir, or pass --overwrite_output_dir "
        f"to replace that run")
    assert (files(here / "checkpoint-6"), files(here)) == kept

    assert train.main(args + ["--overwrite_output_dir"]) == 0   # replaced, as asked
    assert sorted(p.name for p in here.glob("checkpoint-*")) == ["checkpoint-6"]
    assert [e["step"] for e in read_metrics(here)] == [5, 6, 6]  # its own log, from step 4
    assert GPT2LMHeadModel.from_pretrained(here) is not None     # and its own best model
    assert runtime.rundir.is_complete(out / "checkpoint-6")      # the folder it read from


@pytest.mark.slow
def test_a_resume_from_another_folder_starts_this_folders_log_afresh(run, tmp_path):
    """A folder with a killed run's log and no checkpoint: the resumed run's log is new."""
    out, args = run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 9.0}\n')
    args = with_flag(args, "--downstream_model_dir", fresh)
    assert train.main(args + ["--resume", str(out / "checkpoint-4"),
                              "--polarity_eval_size", "0"]) == 0
    assert [e["step"] for e in read_metrics(fresh)] == [5, 6, 6]
    assert (fresh / "model.safetensors").is_file()               # its first evaluation exports


@pytest.mark.slow
def test_on_resume_the_model_is_known_by_its_content(run, tiny_model, tmp_path, capsys):
    """Moved, the same model resumes; replaced (another config, another tokenizer), it is
    named. The resumed run tokenizes with its checkpoint's tokenizer."""
    out, args = run
    moved = Path(shutil.copytree(tiny_model, tmp_path / "moved"))
    args = with_flag(args, "--pretrained_model_name", moved) + ["--resume", "latest"]
    assert train.main(args) == 0
    assert f"--pretrained_model_name changed from '{tiny_model}' to '{moved}'" in (
        capsys.readouterr().err)

    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    assert train.main(args) == 1
    assert error_line(capsys) == (
        f"error: --resume: --pretrained_model_name {moved} is not the model the checkpoint was "
        f"trained from ({tiny_model}): its config or tokenizer differs; resume with that "
        f"model, or start a new --downstream_model_dir")

    (moved / "config.json").write_text(json.dumps(config))
    _, other = other_model(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(other / name, moved / name)
    assert train.main(args) == 1
    assert error_line(capsys) == (
        f"error: --resume: the tokenizer of --pretrained_model_name {moved} differs from the "
        f"one {out / 'checkpoint-6'} was trained with; resume with the model the run started "
        f"from, or start a new --downstream_model_dir")


def test_a_checkpoint_from_before_model_digests_compares_the_model_by_name():
    saved = {"pretrained_model_name": "/models/a", "world_size": 1}
    current = {**saved, "model": "a digest"}
    runtime.checkpoint.check_resume_args(saved, current)
    with pytest.raises(InputError, match="--pretrained_model_name is '/models/b' but the "
                                         "checkpoint was trained with '/models/a'"):
        runtime.checkpoint.check_resume_args(saved, {**current,
                                                     "pretrained_model_name": "/models/b"})


def test_resume_refuses_a_changed_fsdp_but_not_a_checkpoint_from_before_the_flag():
    """Sharded and whole checkpoints hold the weights and AdamW's state differently."""
    saved = {"model": "a digest", "world_size": 2, "fsdp": True}
    with pytest.raises(InputError, match="the checkpoint was saved with --fsdp; resume it "
                                         "with --fsdp"):
        runtime.checkpoint.check_resume_args(saved, {**saved, "fsdp": False})
    before = {"model": "a digest", "world_size": 2}
    runtime.checkpoint.check_resume_args(before, {**before, "fsdp": False}, warn=False)


@pytest.mark.slow
def test_a_checkpoint_renamed_to_another_step_is_named_and_costs_nothing(run, capsys):
    """Going by its name, a resume would start from step 2 and delete checkpoint-4 and
    checkpoint-6 as later, and checkpoint-8, the very one it read, too."""
    out, args = run
    (out / "checkpoint-2").rename(out / "checkpoint-8")          # holds step 2
    assert train.main(args + ["--resume", str(out / "checkpoint-8")]) == 1
    assert error_line(capsys) == (
        f"error: --resume {out / 'checkpoint-8'}: its name says step 8 but it holds step 2 "
        f"(renamed?); rename it checkpoint-2, or resume from another checkpoint")
    assert train.main(args + ["--resume", "latest"]) == 0
    captured = capsys.readouterr()
    assert (f"warning: skipping {out / 'checkpoint-8'}: its name says step 8 but it holds "
            f"step 2") in captured.err
    assert "(step 6, epoch" in captured.out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-4", "checkpoint-6", "checkpoint-8"]


# --------------------------------------------------------------------------- damaged checkpoints

def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGE = {
    "model.safetensors cut short": ("model.safetensors", truncate),
    "training_state.pt garbage": ("training_state.pt", lambda p: p.write_bytes(b"garbage")),
    "training_state.pt cut short": ("training_state.pt", truncate),
    "training_state.pt empty": ("training_state.pt", lambda p: p.write_bytes(b"")),
    "rng_state_0.pt garbage": ("rng_state_0.pt", lambda p: p.write_bytes(b"\x80\x04junk")),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_resume_latest_falls_back_to_the_newest_checkpoint_that_loads(run, capsys, damage):
    out, args = run
    name, spoil = DAMAGE[damage]
    spoil(out / "checkpoint-6" / name)
    assert train.main(args + ["--resume", f"{out / 'checkpoint-6'}"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: --resume {out / 'checkpoint-6'}: not a checkpoint that "
                           f"loads: {name} does not load (")

    assert train.main(args + ["--resume", "latest"]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {out / 'checkpoint-6'}: {name} does not load" in captured.err
    assert "(step 4, epoch 1)" in captured.out
    assert runtime.rundir.is_complete(out / "checkpoint-6")          # written again, whole


# --------------------------------------------------------------------------- full disks

@pytest.mark.slow
def test_a_full_disk_while_saving_training_state_keeps_the_previous_checkpoint(
        run, capsys, monkeypatch):
    """torch.save raises RuntimeError, not OSError, when the disk fills up."""
    out, args = run
    shutil.rmtree(out / "checkpoint-6")
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if str(path).endswith("training_state.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                               "1024 vs 512: PytorchStreamWriter failed writing file data/0")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    assert train.main(args + ["--resume", "latest"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: could not write {out / 'checkpoint-6'} (")
    assert f"{out / 'checkpoint-4'} is intact" in line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_a_full_disk_while_exporting_the_best_model_keeps_the_previous_one(
        run, capsys, monkeypatch):
    out, args = run
    shutil.rmtree(out / "checkpoint-6")
    before = (out / "model.safetensors").read_bytes()

    def full_disk(model, tokenizer, directory, state_dict):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")
    monkeypatch.setattr(runtime.checkpoint, "save_pretrained", full_disk)
    assert train.main(args + ["--resume", "latest"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: could not write {out / 'the best model'} (Error while "
                           f"serializing") and f"what was already in {out} is intact" in line
    assert (out / "model.safetensors").read_bytes() == before
    assert not (out / ".best.tmp").exists()


@pytest.mark.slow
def test_a_full_disk_while_trimming_metrics_on_resume_is_one_line(run, capsys, monkeypatch):
    out, args = run
    before = (out / "metrics.jsonl").read_text()
    import runtime.reporting

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(runtime.reporting, "write_atomically", full_disk)
    assert train.main(args + ["--resume", str(out / "checkpoint-4")]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: could not write {out / 'metrics.jsonl'} (")
    assert "No space left on device" in line
    assert (out / "metrics.jsonl").read_text() == before


# --------------------------------------------------------------------------- the best model

@pytest.mark.parametrize("first_export", [True, False])
def test_the_best_model_loads_after_a_kill_at_any_moment_of_its_export(
        tiny_model, tmp_path, monkeypatch, first_export):
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), tokenizer)
    cpu = runtime.backends.Backend("cpu", "fp32")
    files = None
    for renames_done in range(12):
        out = tmp_path / f"out{renames_done}"
        out.mkdir()
        step_1 = model.transformer.wte.weight.detach().clone()
        if not first_export:
            runtime.checkpoint.export_best(out, cpu, model, tokenizer, step=1)
            with torch.no_grad():
                model.transformer.wte.weight += 1              # the next export differs
        real_replace, calls = os.replace, []

        def dying_replace(src, dst):
            if len(calls) == renames_done:
                raise KeyboardInterrupt  # the kill, between two renames
            calls.append(dst)
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", dying_replace)
        try:
            runtime.checkpoint.export_best(out, cpu, model, tokenizer, step=2)
            files = files or len(calls)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(os, "replace", real_replace)
        if (out / "config.json").exists():
            loaded = GPT2LMHeadModel.from_pretrained(out).transformer.wte.weight
            step_2 = model.transformer.wte.weight
            assert torch.equal(loaded, step_2) or (not first_export and torch.equal(loaded, step_1))
        else:
            assert first_export
    assert files and files < 12  # every moment of the export was tried


def other_model(tmp_path):
    """Another run's model: another tokenizer, another width."""
    import fixtures
    texts = [doc for doc, _ in fixtures.make_reviews(100, seed=5)]
    directory = fixtures.build_tiny_kogpt2(tmp_path / "other", texts, vocab_size=300, n_embd=32)
    return load_model(str(directory), load_tokenizer(str(directory))), directory


@pytest.mark.parametrize("earlier", ["whole", "half-written"])
def test_a_first_export_over_another_runs_best_model_never_mixes_the_two(
        tiny_model, tmp_path, monkeypatch, earlier):
    """A run killed before its first checkpoint leaves its best model (whole, or half
    written by a kill during its export) to the next fresh run in the folder. Whatever
    moment a kill stops that run's first export at, the folder holds one model or none."""
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), tokenizer)
    _, other = other_model(tmp_path)
    cpu = runtime.backends.Backend("cpu", "fp32")
    reference = tmp_path / "reference"
    reference.mkdir()
    runtime.checkpoint.export_best(reference, cpu, model, tokenizer, step=2)
    real_replace, real_unlink = os.replace, os.unlink
    for moments_done in range(12):
        out = tmp_path / f"out{moments_done}"
        shutil.copytree(other, out)
        if earlier == "half-written":
            (out / "config.json").unlink()
        calls = []

        def dying(real):
            def call(*a, **k):
                if len(calls) == moments_done:
                    raise KeyboardInterrupt  # the kill
                calls.append(a)
                return real(*a, **k)
            return call
        monkeypatch.setattr(os, "replace", dying(real_replace))
        monkeypatch.setattr(os, "unlink", dying(real_unlink))
        try:
            runtime.checkpoint.export_best(out, cpu, model, tokenizer, step=2)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(os, "unlink", real_unlink)
        if (out / "config.json").exists():
            assert files(out) in (files(other), files(reference)), (
                f"a mix of two models after {moments_done} steps of the export")
            assert GPT2LMHeadModel.from_pretrained(out) is not None
    assert len(calls) < 12  # every moment of the export was tried


def files(directory):
    return {f.name: f.read_bytes() for f in directory.iterdir() if f.is_file()}


def fake_checkpoint(out, name, step):
    """A folder with only what pruning and going back read: the step it holds."""
    (out / name).mkdir(parents=True)
    torch.save({"progress": {"step": step}}, out / name / "training_state.pt")


def test_a_renamed_checkpoint_costs_no_good_checkpoint_its_place(tmp_path):
    """checkpoint-2 copied to checkpoint-99: by name the newest, so pruning by name alone
    would keep it and delete the real newest ones."""
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, f"checkpoint-{step}", step)
    fake_checkpoint(tmp_path, "checkpoint-99", 2)
    runtime.rundir.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6",
                                                          "checkpoint-99"]
    runtime.rundir.drop_later_checkpoints(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-99"]
    assert runtime.rundir.misnamed(tmp_path / "checkpoint-99") == (
        "its name says step 99 but it holds step 2 (renamed?); rename it checkpoint-2")


# --------------------------------------------------------------------------- non-finite weights

@pytest.mark.slow
def test_weights_that_overflow_are_never_written(train_args, tmp_path, capsys):
    """The first step's loss is finite; the weights it leaves are not."""
    args = train_args + ["--learning_rate", "1e300", "--save_every_steps", "1", "--epochs", "1"]
    assert train.main(args) == 1
    assert error_line(capsys) == ("error: the weights became non-finite at step 1 (is the "
                                  "learning rate too high?); nothing was saved for this step")
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# --------------------------------------------------------------------------- every flag

@pytest.mark.parametrize("flag, value, expected", [
    ("--learning_rate", "nan", "--learning_rate must be positive, got nan"),
    ("--learning_rate", "inf", "--learning_rate must be positive, got inf"),
    ("--learning_rate", "0", "--learning_rate must be positive, got 0.0"),
    ("--max_grad_norm", "-1", "--max_grad_norm must be positive (inf: no clipping); 0 would "
                              "stop learning, a negative one ascend, got -1.0"),
    ("--max_grad_norm", "0", "--max_grad_norm must be positive (inf: no clipping); 0 would "
                             "stop learning, a negative one ascend, got 0.0"),
    ("--max_grad_norm", "nan", "--max_grad_norm must be positive (inf: no clipping); 0 would "
                               "stop learning, a negative one ascend, got nan"),
    ("--weight_decay", "-0.1", "--weight_decay must be 0 or more, got -0.1"),
    ("--weight_decay", "nan", "--weight_decay must be 0 or more, got nan"),
    ("--warmup_ratio", "nan", "--warmup_ratio must be between 0 and 1, got nan"),
    ("--seed", "-1", "--seed must be between 0 and 2**32 - 1, got -1"),
    ("--eval_size", "-1", "--eval_size must be 0 or more (0: all), got -1"),
    ("--seed", str(2**32), f"--seed must be between 0 and 2**32 - 1, got {2**32}"),
])
def test_every_flag_is_checked(train_args, capsys, flag, value, expected):
    assert train.main(train_args + [flag, value]) == 1
    assert error_line(capsys) == f"error: {expected}"


# --------------------------------------------------------------------------- changed arguments

@pytest.mark.slow
def test_a_changed_learning_rate_on_resume_is_applied(run, capsys):
    out, args = run
    shutil.rmtree(out / "checkpoint-6")
    old = {e["step"]: e["lr"] for e in read_metrics(out, "train")}
    assert train.main(args + ["--resume", "latest", "--learning_rate", "3e-3"]) == 0
    assert ("warning: --resume: --learning_rate changed from 0.001 to 0.003 (applied from the "
            "resumed step on)") in capsys.readouterr().err
    new = {e["step"]: e["lr"] for e in read_metrics(out, "train")}
    assert all(new[s] == old[s] for s in (1, 2, 3, 4))
    assert all(math.isclose(new[s], 3 * old[s]) for s in (5, 6))


@pytest.mark.parametrize("changed", [["--epochs", "5"], ["--max_steps", "8"],
                                     ["--warmup_steps", "3"]])
@pytest.mark.slow
def test_changing_the_schedule_on_resume_is_refused(run, capsys, changed):
    out, args = run
    assert train.main(args + ["--resume", "latest", *changed]) == 1
    flag = changed[0]
    assert error_line(capsys).startswith(f"error: --resume: {flag} is ")


@pytest.mark.slow
def test_a_corpus_edited_in_place_is_refused_on_resume(run, capsys):
    out, args = run
    train_file = out.parent / "corpus" / "nsmc" / "ratings_train.txt"
    lines = train_file.read_text(encoding="utf-8").splitlines(keepends=True)
    train_file.write_text("".join(lines[:-1]), encoding="utf-8")    # one review fewer
    assert train.main(args + ["--resume", "latest"]) == 1
    assert error_line(capsys) == (
        "error: --resume: the corpus files differ from the ones the checkpoint was trained "
        "on (edited, or another --downstream_corpus_root_dir); resume with the same files, or "
        "start a new --downstream_model_dir")


@pytest.mark.slow
def test_metrics_lines_stay_json(run):
    out, _ = run
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line)


# ---------------------------------------------------------------- signals, wherever the run is

def faulty_run(fault, number, args):
    """train.py with tests/interrupt.py's `fault` at `number`, as a real process."""
    return run_train([fault, str(number), "--", *args], script="tests/interrupt.py")


@pytest.mark.slow
def test_a_signal_during_an_evaluation_saves_the_step_and_the_resume_evaluates_it(
        train_args, tmp_path):
    """SIGTERM as the evaluation of step 2 starts (the second evaluation): it stops within
    a batch, step 2 is saved, and the resumed run evaluates step 2 before going on."""
    out = tmp_path / "out"
    args = train_args + ["--max_steps", "4", "--eval_every", "2"]
    stopped = faulty_run("sigterm-in-eval", 2, args)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM at step 2: saved {out / 'checkpoint-2'}. To continue, run the "
        f"same command with --resume latest")
    assert [e["step"] for e in read_metrics(out, "eval")] == [0]      # step 2's: cut short
    resumed = run_train(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert [e["step"] for e in read_metrics(out, "eval")] == [0, 2, 4]
    assert (out / "model.safetensors").is_file()                     # exported as the best


@pytest.mark.slow
def test_a_signal_during_the_first_evaluation_stops_with_nothing_to_save(train_args,
                                                                         tmp_path):
    stopped = faulty_run("sigterm-in-eval", 1, train_args)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "stopped by SIGTERM at step 0: nothing was trained yet, so nothing was saved")
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_says_nothing_more_was_saved(train_args, tmp_path):
    stopped = faulty_run("two-signals-in-eval", 2, train_args + ["--eval_every", "2"])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "SIGTERM again: stopped at once; nothing more was saved (the last checkpoint is "
        "intact: --resume latest continues from it)")
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.slow
def test_a_full_disk_at_the_best_model_export_is_one_line_and_leaves_no_temporary_folder(
        train_args, tmp_path):
    out = tmp_path / "out"
    result = faulty_run("best-disk-full", 0, train_args + ["--max_steps", "2"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: could not write {out / 'the best model'} (Error while "
                           f"serializing: IoError")
    assert not (out / ".best.tmp").exists() and not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_a_mistyped_resume_path_is_one_line_before_any_replica_starts(train_args, tmp_path):
    result = run_train(train_args + ["--resume", str(tmp_path / "no-such-checkpoint"),
                                     "--device", "xla"], env={"PJRT_DEVICE": "CPU"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume {tmp_path / 'no-such-checkpoint'}: not a checkpoint that loads: "
        f"config.json is missing; use another checkpoint-<step> folder, or --resume latest")


@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_abandons_the_later_ones(run, capsys):
    out, args = run
    assert train.main(args + ["--resume", str(out / "checkpoint-2"), "--keep_checkpoints",
                              "1"]) == 0
    assert ("warning: removing " + str(out / "checkpoint-6")) in capsys.readouterr().err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]   # the new one


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(train_args):
    """A second after start, train.py is still importing torch and transformers."""
    import subprocess
    import sys
    import time

    from conftest import ROOT
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "banner" not in stdout
    assert stderr.strip().splitlines()[-1] == (
        "stopped by SIGINT during start-up: nothing was saved")
