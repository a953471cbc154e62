"""The warm python (tests/warm_python.py) behaves as `python` does for what the tests use:
argv, working directory, environment, stdin/stdout/stderr, exit codes, signals, resource
limits; a killed client takes its child with it. And FFCV_BIAS_PYTHON reaches TrainerPool."""
import os
import resource
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from ffcv_bias.common import env
from ffcv_bias.sweep.runner import TrainerPool
from warm_python import PID_FILE_ENV_VAR

PROBE = ("import os, sys\n"
         "print('argv', sys.argv[1:], 'cwd', os.getcwd(), 'x', os.environ.get('X'))\n"
         "print('err', file=sys.stderr)\n"
         "print('in', sys.stdin.read().strip())\n"
         "sys.exit(int(sys.argv[1]))\n")


def test_argv_cwd_env_streams_and_exit_code_are_the_callers(warm_python, tmp_path):
    result = subprocess.run([*warm_python, "-c", PROBE, "3", "two words"], cwd=tmp_path,
                            env=dict(os.environ, X="y"), input="stdin text",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout.splitlines() == [
        f"argv ['3', 'two words'] cwd {tmp_path} x y", "in stdin text"]
    assert result.stderr == "err\n"


def test_a_script_and_a_module_run_as_main(warm_python, tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.argv)\nraise SystemExit('said why')\n")
    result = subprocess.run([*warm_python, str(script), "a"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == "said why"
    assert result.stdout.strip() == f"__main__ ['{script}', 'a']"
    module = subprocess.run([*warm_python, "-m", "json.tool"], input='{"a": 1}',
                            capture_output=True, text=True, timeout=60)
    assert module.returncode == 0 and '"a": 1' in module.stdout


def test_an_uncaught_exception_prints_its_traceback_and_exits_1(warm_python):
    result = subprocess.run([*warm_python, "-c", "raise ValueError('bad')"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: bad" in result.stderr


def started(warm_python, tmp_path, code):
    """A child running `code`, and its pid (from the pid file) once it has started."""
    pid_file = tmp_path / "child.pid"
    process = subprocess.Popen([*warm_python, "-c", code], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, **{PID_FILE_ENV_VAR: str(pid_file)}))
    assert process.stdout.readline().strip() == "ready"
    deadline = time.time() + 30   # the client writes it once told the pid: maybe later
    while not (pid_file.is_file() and pid_file.read_text().endswith("\n")):
        assert time.time() < deadline, "no pid file"
        time.sleep(0.01)
    return process, int(pid_file.read_text())


SLEEPER = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"


def test_sigterm_is_forwarded_and_the_client_dies_of_the_same_signal(warm_python, tmp_path):
    process, pid = started(warm_python, tmp_path, SLEEPER)
    assert pid != process.pid
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM


def test_a_child_handling_sigterm_exits_with_its_own_code(warm_python, tmp_path):
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))\n" + SLEEPER)
    process, _ = started(warm_python, tmp_path, code)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 75


def test_a_killed_client_takes_its_child_with_it(warm_python, tmp_path):
    process, pid = started(warm_python, tmp_path, SLEEPER)
    process.kill()
    assert process.wait(timeout=30) == -signal.SIGKILL
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"child {pid} outlived its client")


def test_the_child_gets_the_callers_file_size_limit(warm_python):
    limit = 1 << 20
    result = subprocess.run(
        [*warm_python, "-c", "import resource\n"
                             "print(resource.getrlimit(resource.RLIMIT_FSIZE)[0])"],
        capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.stdout.strip() == str(limit)


def test_ffcv_bias_python_is_split_like_a_shell_and_starts_the_trainers(monkeypatch):
    monkeypatch.delenv(env.PYTHON_ENV_VAR, raising=False)
    assert env.python_command() == [sys.executable]
    monkeypatch.setenv(env.PYTHON_ENV_VAR, "nsys profile -o '/tmp/my prof' python")
    assert env.python_command() == ["nsys", "profile", "-o", "/tmp/my prof", "python"]
    run = SimpleNamespace(config_args=["--config-file", "x.yaml"], config={})
    assert TrainerPool(train_script="train_imagenet.py").command(run) == [
        "nsys", "profile", "-o", "/tmp/my prof", "python", "train_imagenet.py",
        "--config-file", "x.yaml"]
