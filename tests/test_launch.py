"""Replicas and hosts that start a run together, in-process: they agree on the arguments and
the corpus, stop within a bounded time when one cannot join, say in one line when one is
lost or the launch variables are incomplete, and treat SIGHUP as a stop signal. (The same
across real torchrun processes: tests/test_torchrun.py.)"""
import datetime
import json
import os
import pty
import signal
import socket
import threading
import time

import pytest

import runtime.backends
import runtime.torchrun
import train
from runtime.agreement import check_same_run, first_difference, run_description
from runtime.torchrun import TorchrunBackend
from runtime.errors import InputError, ReplicaLost
from runtime.signals import STOP_SIGNALS, Interrupted, StopSignal, silence_hung_up_terminal


class Replicas:
    """A backend whose barrier hands back the payloads the test gives, as if each replica
    had sent its own."""

    def __init__(self, payloads):
        self.payloads, self.world_size = payloads, len(payloads)

    def barrier(self, name, payload=b""):
        return self.payloads


@pytest.fixture
def two_corpora(tmp_path):
    """Two hosts' copies of a corpus, in different folders, with the same bytes."""
    copies = []
    for host in ("a", "b"):
        folder = tmp_path / host / "nsmc"
        folder.mkdir(parents=True)
        for name in ("ratings_train.txt", "ratings_test.txt"):
            (folder / name).write_text(f"id\tdocument\tlabel\n1\t{name}\t1\n")
        copies.append([folder / "ratings_train.txt", folder / "ratings_test.txt"])
    return copies


def described(settings, files):
    return json.dumps(run_description(settings, files)).encode()


def test_replicas_started_alike_on_hosts_with_their_own_paths_agree(two_corpora):
    settings = {"max_steps": 4, "cache_dir": "/a/cache", "downstream_corpus_root_dir": "/a"}
    theirs = {**settings, "cache_dir": "/b/cache", "downstream_corpus_root_dir": "/b"}
    check_same_run(Replicas([described(settings, two_corpora[0]),
                             described(theirs, two_corpora[1])]), settings, two_corpora[0])


def test_a_replica_started_with_another_flag_is_named_in_one_line(two_corpora):
    settings = {"max_steps": 4, "learning_rate": 1e-3, "pretrained_model_name": "m"}
    payloads = [described(settings, two_corpora[0]) for _ in range(3)]
    payloads[2] = described({**settings, "max_steps": 6}, two_corpora[0])
    with pytest.raises(InputError) as raised:
        check_same_run(Replicas(payloads), settings, two_corpora[0])
    assert str(raised.value) == ("--max_steps is 6 in replica 2 but 4 in replica 0: every "
                                 "replica of a run, on every host, needs the same arguments")


def test_a_replica_whose_corpus_file_differs_is_named_with_the_file(two_corpora):
    edited = two_corpora[1][0]
    edited.write_text(edited.read_text() + "2\tone more review\t0\n")
    descriptions = [run_description({"seed": 7}, files) for files in two_corpora]
    problem = first_difference(descriptions)
    assert problem.startswith(f"the corpus file ratings_train.txt differs: replica 1 reads "
                              f"{edited}, whose bytes are not those of replica 0's "
                              f"{two_corpora[0][0]}")
    assert "\n" not in problem


def test_one_replica_checks_nothing(two_corpora):
    class Alone(Replicas):
        def barrier(self, name, payload=b""):
            raise AssertionError("one replica has nobody to wait for")
    check_same_run(Alone([None]), {"seed": 7}, two_corpora[0])


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_process_the_others_wait_for_in_vain_stops_them_within_the_join_timeout(
        monkeypatch):
    """Process 1 of 2 never starts: process 0 stops after JOIN_TIMEOUT with one line, not
    after torch's 30 minutes."""
    monkeypatch.setattr(runtime.torchrun, "JOIN_TIMEOUT", datetime.timedelta(seconds=2))
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    outcome = {}

    def join():
        try:
            TorchrunBackend("cpu", "fp32")
        except Exception as e:
            outcome["error"] = e
    started = time.monotonic()
    waiting = threading.Thread(target=join, daemon=True)  # a hang must not outlive the test
    waiting.start()
    waiting.join(60)
    assert not waiting.is_alive(), "still waiting for the process that never came"
    assert time.monotonic() - started < 30
    error = outcome.get("error")
    assert isinstance(error, ReplicaLost), error
    assert str(error).startswith("not all 2 processes of the run started within 2 s (")
    assert "\n" not in str(error)


def test_a_collective_that_loses_a_process_is_one_line():
    """gloo's error when a process ends in the middle of a collective."""
    class Gloo:
        def all_gather_object(self, payloads, payload):
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:547] Connection closed by peer "
                               "[127.0.0.1]:10160\nmore detail")
    backend = object.__new__(TorchrunBackend)
    backend.dist, backend.world_size = Gloo(), 2
    with pytest.raises(ReplicaLost) as raised:
        backend.barrier("prepared")
    assert str(raised.value) == (
        "another process of the run ended or cannot be reached (barrier 'prepared': "
        "[../gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:10160); "
        "it says why in its own output, or its torchrun does")


@pytest.mark.parametrize("variables", [{"RANK": "1", "WORLD_SIZE": "2"},
                                       {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}])
def test_launch_variables_without_master_addr_are_one_line(monkeypatch, capsys, variables):
    """A script of one's own that sets RANK and WORLD_SIZE by hand: neither a process that
    trains alone nor a traceback from init_process_group."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert train.main(["--device", "cpu", "--downstream_model_dir", "unused"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: ") and "MASTER_ADDR and MASTER_PORT are not" in err
    assert "start them with torchrun" in err


def test_a_lone_process_with_world_size_1_runs_alone(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.backends.choose_device("cpu") == "cpu"


@pytest.fixture
def stop_signal_handlers():
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    StopSignal.signum = None


def test_sighup_stops_as_sigterm_does(stop_signal_handlers):
    """A closed terminal or SSH session: the step is saved and the run stops, in one line;
    the same hang-up passed on a second time (by the shell and the launcher) is no second
    signal."""
    StopSignal.install()
    assert signal.getsignal(signal.SIGHUP) == StopSignal.handle  # else SIGHUP ends pytest
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGHUP)
    assert StopSignal.signum == signal.SIGHUP
    stopped = Interrupted.at(3, StopSignal.signum, "out/checkpoint-3")
    assert stopped.signum == signal.SIGHUP
    assert str(stopped) == ("stopped by SIGHUP at step 3: saved out/checkpoint-3. To continue, "
                            "run the same command with --resume latest")


def test_output_to_a_terminal_that_hung_up_goes_nowhere_instead_of_failing():
    """After a hang-up every write to the terminal fails (EIO): the report lines and the
    last one would end the run before it saves."""
    terminal, output = pty.openpty()
    try:
        os.close(terminal)  # the terminal closes: its other side hangs up
        with pytest.raises(OSError):
            os.write(output, b"step 3: val_loss 4.1\n")
        silence_hung_up_terminal([output])
        assert os.write(output, b"step 3: val_loss 4.1\n") == 21
    finally:
        os.close(output)


def test_output_to_a_live_terminal_or_a_pipe_is_left_alone():
    terminal, output = pty.openpty()
    read_end, write_end = os.pipe()
    try:
        silence_hung_up_terminal([output, write_end])
        os.write(output, b"x")
        assert os.read(terminal, 1) == b"x"
        os.write(write_end, b"y")
        assert os.read(read_end, 1) == b"y"
    finally:
        for fd in (terminal, output, read_end, write_end):
            os.close(fd)
