"""A warm `python` for the test suite: the trainer's imports paid once, not per process.

A fresh trainer process spends some 4 CPU-seconds before its first step (importing torch,
ffcv, numba, pandas; numba's first compile; torch's deterministic-mode import), and the
suite starts dozens: sweeps, the demo, diet's score runs, the README's commands.

    python tests/warm_python.py serve SOCKET [TRAIN ARGS]  # imports (and trains) once
    python tests/warm_python.py run SOCKET ARGS  # behaves as `python ARGS`

The server forks a *handler* per request; the handler forks the *child* that runs ARGS
(`SCRIPT ...`, `-m MODULE ...` or `-c CODE ...`) with the client's stdin/stdout/stderr
(passed over the socket), working directory, environment, resource limits and argv, and
reports its pid (written to $WARM_PYTHON_PID_FILE if set) and exit status.
The client is a small stdlib process in the child's place: the caller's Popen, pipes,
exit codes and signals work as with a real interpreter. SIGTERM, SIGINT, SIGHUP, SIGUSR1,
SIGUSR2 sent to the client are forwarded to the child; a child killed by a signal makes
the client die of the same signal; a client that dies (SIGKILL, a killed process group)
takes the child with it. What differs from a fresh interpreter: the child is not a
process-group leader, and modules are already imported: the child re-reads what they read
from the environment at import (the fault-injection point), except numba's thread pool:
launched when ffcv is imported, it has the server's size, and NUMBA_NUM_THREADS is set to
it in every child (so a trainer's automatic loader-thread count is capped by the cores,
not by a NUMBA_NUM_THREADS of the caller; TrainerPool's explicit --data.num_workers holds).

conftest.py's `warm_python` fixture starts one server per test worker and gives the
client's words, for FFCV_BIAS_PYTHON (ffcv_bias.common.env.python_command) or a
subprocess call. Tests of process start-up itself (import time, a real interpreter's
launch) keep sys.executable.
"""
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import threading

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                     signal.SIGUSR2)
# The client writes the child's pid there: SIGKILL cannot be forwarded, and a test that
# kills "the trainer" must kill the process that writes its files.
PID_FILE_ENV_VAR = "WARM_PYTHON_PID_FILE"
CLIENT_FAILURE = 125  # the client could not reach the server (not an exit of the child)


# ---- messages: JSON lines; the request carries the client's stdin, stdout, stderr --------

def send_message(sock, message, fds=()):
    data = (json.dumps(message) + "\n").encode()
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    sock.sendall(data[sent:])


def receive_request(sock):
    """(request, its three fds), or (None, []) when the client closed the connection. The
    client sends nothing after its request, so nothing past its newline is lost."""
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
    while data and not data.endswith(b"\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            return None, fds
        data += chunk
    return (json.loads(data) if data else None), fds


def current_limits():
    """The client's resource limits (RLIMIT_FSIZE: a test's full disk), for the child."""
    return {name: resource.getrlimit(getattr(resource, name))
            for name in dir(resource) if name.startswith("RLIMIT_")}


# ---- the client ----------------------------------------------------------------------

def client(socket_path, args):
    pending, child = [], []

    def forward(signum, _frame):
        if child:
            os.kill(child[0], signum)
        else:
            pending.append(signum)   # before the child exists: delivered once it does

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    for fd in (0, 1, 2):   # a caller may have closed one: the child gets /dev/null there
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as error:
        print(f"warm_python: no server at {socket_path}: {error}", file=sys.stderr)
        return CLIENT_FAILURE
    send_message(sock, {"args": args, "cwd": os.getcwd(), "env": dict(os.environ),
                        "limits": current_limits()}, fds=(0, 1, 2))
    replies = sock.makefile("rb")
    started = replies.readline()
    if not started:
        print("warm_python: the server closed the connection", file=sys.stderr)
        return CLIENT_FAILURE
    child.append(json.loads(started)["pid"])
    if os.environ.get(PID_FILE_ENV_VAR):   # for a caller that must signal the child itself
        with open(os.environ[PID_FILE_ENV_VAR], "w") as pid_file:
            pid_file.write(f"{child[0]}\n")
    for signum in pending:
        os.kill(child[0], signum)
    ended = replies.readline()
    if not ended:
        print("warm_python: the server died before the child ended", file=sys.stderr)
        return CLIENT_FAILURE
    code = json.loads(ended)["exit_code"]
    if code < 0:   # killed by a signal: so is this process, as a caller expects
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


# ---- the server ----------------------------------------------------------------------

# What every trainer, sweep launcher, analysis and study imports at start: paid once, here.
WARM_MODULES = ("ffcv_bias.train.launch",          # torch, ffcv, numba
                "ffcv_bias.analysis.__main__",     # pandas, scipy, matplotlib
                "ffcv_bias.sweep.cli", "ffcv_bias.studies.diet.cli",
                "ffcv_bias.studies.transfer", "ffcv_bias.studies.preservation.cli")


def warm_up(train_args):
    """Imports, then (with `train_args`) one tiny training run in this process: what a
    trainer compiles once per process (numba's typed containers, torch's first kernels)
    is then compiled before any fork, as a trainer that already ran one run has it."""
    import gc
    import importlib
    for name in WARM_MODULES:
        importlib.import_module(name)
    import numba
    import torch
    from ffcv_bias.train import launch, state
    torch.use_deterministic_algorithms(True)   # its first call imports torch's inductor
    torch.use_deterministic_algorithms(False)
    numba.njit(lambda value: value + 1)(1)      # numba's compiler, initialised
    if train_args:
        # One torch thread: an OpenMP pool started here would hang the forked children.
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        with state.torch_settings_kept():
            code = launch.main(train_args)
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
        if code != 0:
            raise SystemExit(f"warm_python: the warm-up run failed (exit {code})")
    # ffcv's loader threads that were told to stop (data/loaders.py) end within their
    # 0.5 s poll; then the run's loaders are garbage, collected here and not in a child.
    # Its decoders' fixed rows are then free (data/augment.py FixedRows), so a child's
    # decoders get the rows, hence the compiled code (ffcv_patches patch 9), of this run.
    join_loader_threads()
    for _ in range(3):   # finalizers run in one pass can free more in the next
        if not gc.collect():
            break


def join_loader_threads(timeout_s=10):
    from ffcv.loader.epoch_iterator import EpochIterator
    for thread in threading.enumerate():
        if isinstance(thread, EpochIterator):
            thread.join(timeout=timeout_s)


def serve(socket_path, train_args):
    ready = os.fdopen(os.dup(1), "w")   # stdout is the caller's "ready" pipe: kept apart
    os.dup2(2, 1)                       # from what the warm-up run prints (to the log)
    warm_up(train_args)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # handlers are reaped by the kernel
    print("ready", file=ready, flush=True)
    ready.close()
    while True:
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            handle(connection)    # never returns
        connection.close()


def handle(connection):
    """In a forked handler: start the child, report its pid, then its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, fds = receive_request(connection)
    if request is None:
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        connection.close()
        become_child(request, fds)   # never returns
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):   # a client that died cannot be told
        send_message(connection, {"pid": pid})
        send_message(connection, {"exit_code": wait_or_kill(pid, connection)})
    os._exit(0)


def wait_or_kill(pid, connection):
    """The child's exit code (negative: killed by that signal); SIGKILLs it if the client
    goes away first."""
    import select
    child_ended = os.pidfd_open(pid)
    ready, _, _ = select.select([child_ended, connection], [], [])
    if child_ended not in ready and not connection.recv(1):   # the client is gone
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def become_child(request, fds):
    """Turn this forked process into `python ARGS` as the client would have run it."""
    code, killed_by = 1, None
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (*FORWARDED_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else signal.SIG_DFL)
        for name, limits in request["limits"].items():
            with contextlib.suppress(ValueError, OSError):   # one the kernel keeps
                resource.setrlimit(getattr(resource, name), tuple(limits))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        reread_import_time_settings()
        code = run_args(request["args"])
    except BaseException as error:   # what the interpreter prints before it exits
        import traceback
        traceback.print_exc()
        if isinstance(error, KeyboardInterrupt):   # it then dies of SIGINT
            killed_by = signal.SIGINT
    finally:   # as the interpreter ends: exit handlers, flushed output (even a closed one)
        import atexit
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        if killed_by is not None:
            signal.signal(killed_by, signal.SIG_DFL)
            os.kill(os.getpid(), killed_by)
        os._exit(code)


def reread_import_time_settings():
    import numba
    from ffcv_bias.record import faults
    from tqdm import tqdm
    from tqdm.std import TqdmDefaultWriteLock
    # numba re-reads its NUMBA_* variables at each compile and refuses a new pool size
    # once its threads are launched (ffcv's import launches them, in the server).
    os.environ["NUMBA_NUM_THREADS"] = str(numba.config.NUMBA_NUM_THREADS)
    faults.arm(os.environ.get(faults.ENV_VAR))
    # tqdm's write lock is a multiprocessing semaphore shared through fork: a sibling
    # SIGKILLed while holding it would hang this child.
    for owner, name in ((tqdm, "_lock"), (TqdmDefaultWriteLock, "mp_lock")):
        if name in vars(owner):
            delattr(owner, name)


def run_args(args):
    """`python SCRIPT ARGS...`, `python -m MODULE ARGS...` or `python -c CODE ARGS...`:
    the exit code."""
    import runpy
    try:
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path[0] = ""
            import types
            sys.modules["__main__"] = module = types.ModuleType("__main__")
            exec(compile(args[1], "<string>", "exec"), module.__dict__)
        elif args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
        return 0
    except SystemExit as stop:
        return exit_status(stop.code)


def exit_status(code):
    """What the interpreter makes of SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    command, socket_path, *rest = sys.argv[1:]
    if command == "serve":
        serve(socket_path, rest)
    else:
        sys.exit(client(socket_path, rest))
