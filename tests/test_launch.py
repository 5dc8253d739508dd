"""`pretrain_gpt.py` end to end (tokenizer -> preprocessed sample -> GPTDataset -> training) under
the launchers users run: the same seed and data give the same losses under `deepspeed` and
`torchrun` (and `mpirun` where Open MPI is installed), with 2 processes on gloo."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from megatron_snm.parallel.spawn import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
LOSS = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: (\S+) \|")
VALID = re.compile(r" validation loss at iteration (\d+) \| lm loss value: (\S+) \|")


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("launch")
    train = str(sample_dir / "c4-train.00000-of-00001.json.gz")
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", train, "--model-prefix", str(out / "tok"),
                    "--vocab-size", "500"], cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", train, "--output-prefix", str(out / "c4"),
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(out / "tok.model"),
                    "--append-eod"], cwd=REPO, check=True, capture_output=True)
    return out


def train_args(data, run_dir):
    return ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6",
            "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--zero-stage", "1",
            "--data-path", str(data / "c4_text_document"), "--split", "90,10,0", "--data-cache-path",
            str(data / "cache"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            str(data / "tok.model"), "--save", str(run_dir / "ckpt"), "--tensorboard-dir", str(run_dir / "tb")]


def run(launcher_argv, run_dir):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(launcher_argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    losses = {int(i): float(v) for i, v in LOSS.findall(out)}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6], out[-5000:]
    assert (run_dir / "ckpt" / "latest").read_text() == "iter_0000006"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tb"))
    return losses, {int(i): float(v) for i, v in VALID.findall(out)}


@pytest.fixture(scope="module")
def deepspeed_run(sample_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ds")
    return run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                *train_args(sample_data, run_dir)], run_dir)


def test_deepspeed_and_torchrun_give_the_same_losses(deepspeed_run, sample_data, tmp_path):
    losses, valid = run([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                         *train_args(sample_data, tmp_path)], tmp_path)
    assert losses == pytest.approx(deepspeed_run[0], rel=1e-6) and valid == pytest.approx(deepspeed_run[1], rel=1e-6)
    assert losses[6] < losses[1]


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="mpirun not installed (tools/install_system_deps.sh installs Open MPI)")
def test_mpirun_gives_the_same_losses(deepspeed_run, sample_data, tmp_path):
    losses, valid = run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PYTHONPATH", "-x",
                         "PATH", "-x", "OMP_NUM_THREADS", "-x", f"MASTER_PORT={free_port()}", sys.executable,
                         *train_args(sample_data, tmp_path)], tmp_path)
    assert losses == pytest.approx(deepspeed_run[0], rel=1e-6) and valid == pytest.approx(deepspeed_run[1], rel=1e-6)


@pytest.mark.parametrize("launcher_name", ["torchrun", "deepspeed"])
def test_workers_end_when_their_launcher_is_killed(sample_data, tmp_path, launcher_name):
    """SIGKILL of the launcher alone (its workers are not told): each worker notices within seconds.
    torchrun's workers are its children; the deepspeed runner's are its per-node `launch`'s."""
    import psutil

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    argv = train_args(sample_data, tmp_path)
    argv[argv.index("--train-iters") + 1] = "100000"
    spread = ["--nproc_per_node", "2"] if launcher_name == "torchrun" else ["--num_gpus", "2"]
    launcher = subprocess.Popen([os.path.join(BIN, launcher_name), *spread, "--master_port", str(free_port()), *argv],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree = []  # orphans are no longer our descendants: remembered for the clean-up
    try:
        deadline = time.time() + 240
        while not (tmp_path / "tb").exists():  # the workers are training
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.5)
        agent = psutil.Process(launcher.pid)
        if launcher_name == "deepspeed":
            (agent,) = agent.children()  # deepspeed.launcher.launch, which starts the workers
        workers = agent.children()
        assert len(workers) == 2, [p.cmdline() for p in workers]
        tree = psutil.Process(launcher.pid).children(recursive=True)
        launcher.kill()
        launcher.wait()
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers {[p.pid for p in alive]} still running 15 s after their launcher was killed"
    finally:
        for proc in tree + psutil.Process().children(recursive=True):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def test_plain_python_run_with_the_default_port_busy(sample_data, tmp_path):
    """A single `python pretrain_gpt.py` picks a free rendezvous port when the default one is taken."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    argv = train_args(sample_data, tmp_path)
    argv[argv.index("--train-iters") + 1] = "2"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 29500))
        busy.listen()
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000002"


def test_errors_after_the_process_group_starts_are_one_line(sample_data, tmp_path):
    """A checkpoint problem found after the process group exists: one line per rank that found it, exit
    status 2, the traceback only with --debug."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "latest").write_text("iter_0000042")
    argv = train_args(sample_data, tmp_path) + ["--load", str(tmp_path / "bad")]
    for debug in (False, True):
        proc = subprocess.run([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port",
                               str(free_port()), *argv, *(["--debug"] if debug else [])], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_gpt.py: error:")]
        # One line from each rank that reached the check: torchrun SIGTERMs the other rank as soon as the
        # first exits, which on a busy machine can be before it got there.
        assert 1 <= len(errors) <= 2, proc.stderr[-2000:]
        assert all("names 'iter_0000042', which is not a checkpoint directory" in line for line in errors)
        # torchrun prints its own traceback for a failed worker; ours (frames in megatron_snm/) only with --debug.
        assert (os.path.join(REPO, "megatron_snm") in proc.stderr) == debug
        # torchrun reports the first rank it saw fail: ours exits 2; a rank torchrun SIGTERMs while it is
        # still leaving can abort in gloo's teardown (-6) on a loaded machine. Both ranks printed the line.
        assert re.search(r"exitcode\s*:\s*(2|-6)\b", proc.stderr), proc.stderr[-2000:]
        assert proc.returncode != 0


@pytest.mark.parametrize("argv, launcher", [
    (["bash", "-c", "nohup deepspeed --num_gpus 2 pretrain_gpt.py &"], False),  # what `ssh host 'nohup deepspeed ...&'` runs
    (["sh", "-c", "torchrun --nproc_per_node 2 pretrain_gpt.py"], False),
    (["python", "train_with_deepspeed.py"], False),
    (["python", "-c", "import deepspeed"], False),
    (["/venv/bin/python3", "/venv/bin/deepspeed", "--num_gpus", "2", "pretrain_gpt.py"], True),
    (["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="], True),
    (["/venv/bin/python3.11", "/venv/bin/torchrun", "--nproc_per_node", "2"], True),
    (["python", "-mtorch.distributed.run", "--nproc_per_node", "2"], True),
    (["mpirun", "-np", "2", "python", "pretrain_gpt.py"], True),
    (["/usr/lib/openmpi/bin/orted", "-mca", "ess", "env"], True),
])
def test_a_launcher_is_recognised_by_what_it_runs(argv, launcher):
    from megatron_snm.parallel.launcher_watchdog import is_launcher

    assert is_launcher(argv) == launcher


def test_a_shell_that_started_the_launcher_may_exit(sample_data, tmp_path):
    """`bash -c "nohup deepspeed ... &"` whose shell exits while the run trains: the run goes on
    to the end (the watchdog once took the shell, whose command line says "deepspeed", for the
    launcher and killed the healthy run)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    argv = " ".join(train_args(sample_data, tmp_path))
    log = tmp_path / "train.log"
    # The shell waits until the workers train (their watchdog is running), then exits.
    script = (f"nohup deepspeed --num_gpus 2 --master_port {free_port()} {argv} > {log} 2>&1 & "
              f"while [ ! -e {tmp_path / 'tb'} ]; do sleep 0.2; done")
    shell = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, timeout=240)
    assert shell.returncode == 0
    deadline = time.time() + 240
    while not (tmp_path / "ckpt" / "latest").exists() and "exits instead of training" not in log.read_text():
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000006", log.read_text()[-3000:]


def start_long_run(sample_data, run_dir, *extra):
    """A 2-rank deepspeed run of many iterations, once both ranks train: (launcher, workers by rank)."""
    import psutil

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    argv = train_args(sample_data, run_dir) + list(extra)
    argv[argv.index("--train-iters") + 1] = "100000"
    log = open(run_dir / "launcher.log", "w")
    launcher = subprocess.Popen([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                                 *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while not re.search(r" iteration\s+2/", (run_dir / "launcher.log").read_text()):
        assert launcher.poll() is None and time.time() < deadline, (run_dir / "launcher.log").read_text()[-3000:]
        time.sleep(0.3)
    (agent,) = psutil.Process(launcher.pid).children()
    workers = sorted(agent.children(), key=lambda w: int(w.environ()["RANK"]))
    return launcher, workers


def end_run(launcher, workers, timeout=60):
    """Waits for the launcher (its output), then kills whatever is left."""
    import signal

    try:
        launcher.wait(timeout=timeout)
    finally:
        for proc in workers:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except Exception:  # psutil.NoSuchProcess
                pass
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait()


def our_errors(log_text):
    """The error lines our workers printed, and whether any traceback ran through our code."""
    lines = [line for line in log_text.splitlines() if "pretrain_gpt.py: " in line and "error:" in line
             or "pretrain_gpt.py: interrupted" in line]
    return lines, bool(re.search(r'File ".*(megatron_snm/|pretrain_gpt\.py)', log_text))


def test_a_killed_rank_ends_the_others_with_one_line(sample_data, tmp_path):
    launcher, workers = start_long_run(sample_data, tmp_path, "--log-interval", "1")
    workers[1].kill()
    end_run(launcher, workers)
    lines, traceback = our_errors((tmp_path / "launcher.log").read_text())
    assert len(lines) == 1 and not traceback, (tmp_path / "launcher.log").read_text()[-3000:]
    assert f"lost rank 1 (pid {workers[1].pid} on " in lines[0] and "rank 0 stops here" in lines[0]
    assert "--load" in lines[0] and launcher.returncode != 0


def test_a_stopped_rank_ends_the_run_after_the_distributed_timeout(sample_data, tmp_path):
    """SIGSTOP: the other rank waits --distributed-timeout-minutes (here 0.05, 3 s), not gloo's 30
    minutes, and says which rank stopped answering."""
    import signal

    launcher, workers = start_long_run(sample_data, tmp_path, "--log-interval", "1",
                                       "--distributed-timeout-minutes", "0.05")
    workers[1].send_signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        while "error:" not in (tmp_path / "launcher.log").read_text():
            assert time.time() - stopped < 60, "no message 60 s after a rank stopped with a 3 s timeout"
            time.sleep(0.3)
        waited = time.time() - stopped
        workers[1].kill()  # a stopped process holds its SIGTERM from the launcher until continued
    finally:
        end_run(launcher, workers)
    lines, traceback = our_errors((tmp_path / "launcher.log").read_text())
    assert len(lines) == 1 and not traceback, (tmp_path / "launcher.log").read_text()[-3000:]
    assert f"rank 1 (pid {workers[1].pid} on " in lines[0] and "stopped" in lines[0]
    print("waited", waited)
    assert "--distributed-timeout-minutes (0.05)" in lines[0] and 2.5 < waited < 60


def test_ctrl_c_ends_every_rank_with_one_line(sample_data, tmp_path):
    import signal

    launcher, workers = start_long_run(sample_data, tmp_path)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole foreground group
    end_run(launcher, workers)
    lines, traceback = our_errors((tmp_path / "launcher.log").read_text())
    # The deepspeed launcher kills its workers on SIGINT: a rank it killed first prints nothing.
    assert 1 <= len(lines) <= 2 and not traceback, (tmp_path / "launcher.log").read_text()[-3000:]
    assert all(("interrupted (Ctrl-C)" in line or "lost rank" in line) and "--load" in line for line in lines)


def test_a_master_port_in_use_is_one_line_naming_it(sample_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    with socket.socket() as busy:  # another job on this node holds the port
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                               *train_args(sample_data, tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=240)
    out = proc.stdout + proc.stderr
    lines, traceback = our_errors(out)
    assert lines and not traceback and proc.returncode != 0, out[-3000:]
    assert f"--master_port {port} is already in use" in lines[0]


def test_only_errors_of_a_lost_rank_or_a_taken_port_are_reworded():
    from megatron_snm.parallel.distributed import port_in_use_message
    from megatron_snm.parallel.lost_rank import lost_rank_message

    closed = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[10.0.0.7]:46004. This is typically caused by a remote worker crashing.")
    assert "lost a rank at 10.0.0.7:46004" in lost_rank_message(closed)  # on another node: named by its address
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv operation")
    assert "no answer within --distributed-timeout-minutes" in lost_rank_message(timed_out)
    for other in (RuntimeError("CUDA out of memory"), ValueError("Connection reset by peer"), closed.__class__("")):
        assert lost_rank_message(other) is None and port_in_use_message(other) is None
    taken = RuntimeError("The server socket has failed to listen on any local network address. port: 29500, "
                         "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")
    assert port_in_use_message(taken).startswith("--master_port 29500 is already in use on ")
