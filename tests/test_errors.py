"""Bad input gets one clear line naming the file, line or flag and what to do, a non-zero
exit status and no traceback; nothing already saved is lost."""
import subprocess
import sys

import pytest
from conftest import run_train

import options
import train


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.slow
def test_missing_corpus_with_no_network(train_args, tmp_path):
    empty = tmp_path / "empty"
    args = train_args + ["--downstream_corpus_root_dir", str(empty)]
    # A proxy that refuses every connection: no network, at once.
    no_network = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    result = run_train(args, env=no_network)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: NSMC is not at {empty}/nsmc/ratings_train.txt and "
                           f"downloading it failed")
    assert "--downstream_corpus_root_dir" in line
    assert not empty.exists()  # no empty nsmc/ folder left behind to mislead the next run


@pytest.mark.parametrize("content, expected", [
    (b"", "ratings_train.txt: the file is empty"),
    (b"1\tgood\t1\n", "ratings_train.txt:1: expected the header 'id<TAB>document<TAB>label'"),
    (b"id\tdocument\tlabel\n1\tgood\t1\n2\tbad\n",
     "ratings_train.txt:3: expected 3 tab-separated fields (id, document, label), found 2"),
    (b"id\tdocument\tlabel\n1\tgood\t1\n2\tbad\tnegative\n",
     "ratings_train.txt:3: label must be 0 or 1, found 'negative'"),
    (b"id\tdocument\tlabel\n1\t\xc0\xaf\t1\n", "ratings_train.txt:2: byte 0xc0 is not UTF-8"),
    (b"id\tdocument\tlabel\n1\t\t1\n", "ratings_train.txt: no reviews with text"),
])
def test_malformed_corpus_file(train_args, corpus, capsys, content, expected):
    (corpus / "nsmc" / "ratings_train.txt").write_bytes(content)
    assert train.main(train_args) == 1
    line = error_line(capsys)
    assert str(corpus / "nsmc") in line and expected in line


@pytest.mark.slow
def test_crlf_and_bom_simply_work(train_args, corpus, tmp_path, capsys):
    for name in ("ratings_train.txt", "ratings_test.txt"):
        path = corpus / "nsmc" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert train.main(train_args + ["--max_steps", "2"]) == 0
    assert "258 (1 blank skipped" in capsys.readouterr().out


@pytest.mark.parametrize("flags, expected", [
    (["--max_seq_length", "2"], "--max_seq_length 2 is too small: the polarity word and </s> "
                                "leave no room for the review; use at least 3"),
    (["--batch_size", "0"], "--batch_size must be 1 or more, got 0"),
    (["--batch_size", "-4"], "--batch_size must be 1 or more, got -4"),
    (["--epochs", "0"], "--epochs must be 1 or more, got 0"),
    (["--batch_size", "1000"], "258 training examples cannot fill one batch of --batch_size 1000"),
    (["--device", "xla", "--tpu_cores", "0"], "--tpu_cores 0 contradicts --device xla"),
    (["--tpu_cores", "8"], "--tpu_cores 8 contradicts --device cpu; drop one of them"),
])
def test_bad_flags(train_args, capsys, flags, expected):
    assert train.main(train_args + flags) == 1
    assert expected in error_line(capsys)


@pytest.mark.parametrize("flags, expected", [
    (["--device", "auto", "--tpu_cores", "8"],
     "--tpu_cores 8: no TPU is attached to this machine; leave --tpu_cores out"),
    (["--device", "xla", "--tpu_cores", "8"],   # XLA on the CPU takes every device anyway
     "--tpu_cores 8: no TPU is attached to this machine; leave --tpu_cores out"),
    (["--device", "auto", "--tpu_cores", "1"],  # would start XLA on the CPU unasked
     "--tpu_cores 1: no TPU is attached to this machine; leave --tpu_cores out"),
    (["--device", "xla", "--compile"],
     "--compile does nothing on XLA, which compiles every step already; leave it out"),
])
def test_flags_that_would_do_nothing_here_are_refused(train_args, capsys, monkeypatch, flags,
                                                      expected):
    monkeypatch.setattr(options, "xla_accelerator", lambda: False)  # no TPU here
    assert train.main(train_args + flags) == 1
    assert error_line(capsys) == f"error: {expected}"


@pytest.mark.slow
def test_model_that_cannot_be_downloaded(train_args):
    result = run_train(train_args + ["--pretrained_model_name", "no-such-org/no-such-model"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    # HF_HUB_OFFLINE=1 is set (conftest): the advice does not ask for it again.
    assert line.startswith("error: --pretrained_model_name no-such-org/no-such-model: it is not "
                           "a local directory, and HF_HUB_OFFLINE is set, so only the Hugging "
                           "Face cache was searched")
    assert "HF_HUB_OFFLINE=1" not in line


def test_offline_advice_only_when_not_offline_already(monkeypatch):
    import model
    monkeypatch.setattr(model.constants, "HF_HUB_OFFLINE", False)
    assert "(offline: HF_HUB_OFFLINE=1)" in model.not_found_hint("no-such-org/no-such-model")
    monkeypatch.setattr(model.constants, "HF_HUB_OFFLINE", True)
    assert "unset HF_HUB_OFFLINE" in model.not_found_hint("no-such-org/no-such-model")


def test_a_hub_retry_is_one_line(caplog):
    """huggingface_hub logs a failed try, then "Retrying in ..."; only the second is shown."""
    import logging

    import model  # noqa: F401 (installs the filter)
    http = logging.getLogger("huggingface_hub.utils._http")
    with caplog.at_level(logging.WARNING, logger=http.name):
        http.warning("'(MaxRetryError(...))' thrown while requesting HEAD https://huggingface.co/x")
        http.warning("Retrying in 1s [Retry 1/5].")
    assert [r.getMessage() for r in caplog.records] == ["Retrying in 1s [Retry 1/5]."]


def test_output_directory_that_cannot_be_written(train_args, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train.main(train_args + ["--downstream_model_dir", str(blocker / "out")]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: --downstream_model_dir {blocker / 'out'} cannot be written")
    assert "choose a writable directory" in line


def hold_lock(directory):
    """Another process holding the output directory, as a running training would."""
    code = (
        "import sys, time; from runtime import rundir; lock = rundir.exclusive(sys.argv[1]); "
        "lock.__enter__(); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)],
        cwd=train.__file__.rsplit("/", 1)[0],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_refuses_to_start(train_args, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        assert train.main(train_args + ["--max_steps", "2"]) == 1
        line = error_line(capsys)
        assert line == (
            f"error: --downstream_model_dir {out} is in use by another training "
            f"run (pid {holder.pid}); wait for it to finish or choose another directory"
        )
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock went with it, and the directory is fine to use.
    assert train.main(train_args + ["--max_steps", "2"]) == 0
    assert train.main(train_args + ["--max_steps", "2", "--resume", "latest"]) == 0
