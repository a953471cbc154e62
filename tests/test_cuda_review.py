"""The CUDA paths a code review still doubted (issue 30), tested on the CPU as far as the
logic allows; what only a GPU shows is measured by bench/gpu_check.sh.

- torchrun keeps the preemption contract through `python -m ffcv_bias.train.torchrun`:
  SIGUSR2 is passed on to the workers, and a stop is exit 75, not torchrun's 1;
- dist.timeout reaches init_process_group (outside the run_id); every rank stops after the
  same step, the step the stop was asked in, whatever the cadence of the GPU's checks;
- fp16: an overflow is the GradScaler's business (the step is skipped), only a loss that
  stays non-finite ends the run, and the scaler's step reads nothing on the host;
- the label-preservation study copies its batches to the GPU inside the pipeline;
- BatchNorm recompute all-reduces every rank's statistics: two gloo processes end with
  what one process computes over the union of their batches;
- bench/gpu_check.py counts the syncs of steps apart from those of the epochs' ends.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ffcv_bias.common.errors import EXIT_PREEMPTED
from ffcv_bias.train import distributed
from ffcv_bias.train import torchrun as preemptible
from ffcv_bias.train.batchnorm import recompute_bn_statistics
from ffcv_bias.train.state import NonFiniteLossError, Preempted
from ffcv_bias.train.step_checks import NONFINITE_LOSS_STEPS, StepChecks

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ALONE = distributed.DistInfo()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------------------
# 1. torchrun: SIGUSR2 passed on, exit 75
# ----------------------------------------------------------------------------------------

def test_the_agent_handles_sigusr2_and_knows_where_workers_say_they_stopped(tmp_path):
    marker = tmp_path / "preempted"
    environment = preemptible.agent_environment({"PATH": "/bin"}, marker)
    for name in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE"):
        assert environment[name] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
    assert environment[preemptible.MARKER_VARIABLE] == str(marker)
    assert environment["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(preemptible.SHUTDOWN_TIMEOUT_S)
    # A user's own list and timeout are kept, SIGUSR2 added once.
    mine = preemptible.agent_environment({"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGUSR2",
                                          "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}, marker)
    assert mine["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGUSR2"
    assert mine["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"


def test_exit_codes(tmp_path):
    marker = tmp_path / "preempted"
    assert preemptible.exit_code(None, marker) == 0
    assert preemptible.exit_code("failed", marker) == 1
    assert preemptible.exit_code(2, marker) == 2
    assert preemptible.exit_code(signal.SIGTERM, marker) == EXIT_PREEMPTED
    assert preemptible.exit_code(signal.SIGUSR2, marker) == EXIT_PREEMPTED
    assert preemptible.exit_code(signal.SIGINT, marker) == 130
    marker.touch()  # a worker stopped for a signal: torchrun's failure is a stop
    assert preemptible.exit_code("failed", marker) == EXIT_PREEMPTED


def test_say_preempted_touches_the_marker_only_under_the_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv(preemptible.MARKER_VARIABLE, raising=False)
    preemptible.say_preempted()  # no launcher: nothing to do
    monkeypatch.setenv(preemptible.MARKER_VARIABLE, str(tmp_path / "preempted"))
    preemptible.say_preempted()
    assert (tmp_path / "preempted").exists()


def test_the_agent_ignores_a_second_signal_while_its_workers_stop():
    calls = []
    once = preemptible.first_signal_only(lambda signum, frame: calls.append(signum))
    once(signal.SIGUSR2, None)
    once(signal.SIGTERM, None)  # SLURM's SIGTERM at the limit, after its USR2 warning
    assert calls == [signal.SIGUSR2]


# A stand-in for train_imagenet.py under torchrun: takes SIGTERM / SIGUSR2 as the trainer's
# StopRequest does, says it stopped (launch.train_worker calls say_preempted) and exits 75.
STAND_IN_WORKER = """
import os, signal, sys, time
from pathlib import Path
from ffcv_bias.train.torchrun import say_preempted
stopped = []
for number in (signal.SIGTERM, signal.SIGUSR2):
    signal.signal(number, lambda signum, frame: stopped.append(signum))
Path(sys.argv[2], "ready" + os.environ["RANK"]).write_text(str(os.getpid()))
if sys.argv[1] == "stop-by-itself":   # the worker alone got the signal
    say_preempted()
    sys.exit(75)
if sys.argv[1] == "fail":
    sys.exit(3)
while not stopped:
    time.sleep(0.02)
Path(sys.argv[2], "stopped" + os.environ["RANK"]).write_text(signal.Signals(stopped[0]).name)
say_preempted()
sys.exit(75)
"""


def launch(tmp_path, launcher, mode, processes=2):
    script = tmp_path / "worker.py"
    script.write_text(STAND_IN_WORKER)
    module = {"ffcv_bias": "ffcv_bias.train.torchrun", "torchrun": "torch.distributed.run"}
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE",
                 preemptible.MARKER_VARIABLE, "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        environment.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", module[launcher],
                             f"--nproc_per_node={processes}", "--standalone",
                             "--monitor-interval=0.1", str(script), mode, str(tmp_path)],
                            env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_workers(tmp_path, agent, processes=2, timeout=120):
    deadline = time.time() + timeout
    ready = [tmp_path / f"ready{rank}" for rank in range(processes)]
    while not all(path.exists() and path.read_text() for path in ready):
        assert agent.poll() is None and time.time() < deadline, agent.communicate()
        time.sleep(0.05)
    return [int(path.read_text()) for path in ready]


@pytest.mark.parametrize("number", [signal.SIGUSR2, signal.SIGTERM])
def test_a_stop_signal_to_the_agent_reaches_every_worker_and_exits_75(tmp_path, number):
    agent = launch(tmp_path, "ffcv_bias", "wait")
    wait_for_workers(tmp_path, agent)
    agent.send_signal(number)
    _, stderr = agent.communicate(timeout=120)
    assert agent.returncode == EXIT_PREEMPTED, stderr
    assert stderr.strip().splitlines()[-1].startswith("torchrun: the run was stopped by a "
                                                      "signal")
    name = signal.Signals(number).name
    assert [(tmp_path / f"stopped{rank}").read_text() for rank in range(2)] == [name, name]


def test_plain_torchrun_dies_of_sigusr2_and_leaves_its_workers(tmp_path):
    """The defect itself: SIGUSR2's default action kills the agent; its workers (in
    sessions of their own) never hear of it, and under srun the end of the step kills them
    wherever they are."""
    agent = launch(tmp_path, "torchrun", "wait")
    pids = wait_for_workers(tmp_path, agent)
    try:
        agent.send_signal(signal.SIGUSR2)
        # wait, not communicate: the orphans hold the agent's output pipes open.
        assert agent.wait(timeout=60) == -signal.SIGUSR2
        time.sleep(0.5)
        assert not any((tmp_path / f"stopped{rank}").exists() for rank in range(2))
    finally:
        for pid in pids:  # the orphans
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        agent.communicate(timeout=60)


@pytest.mark.parametrize("launcher, mode, expected", [
    ("ffcv_bias", "stop-by-itself", EXIT_PREEMPTED),
    ("torchrun", "stop-by-itself", 1),   # torchrun's own view: a failed worker
    ("ffcv_bias", "fail", 1),
])
def test_workers_that_stopped_by_themselves_make_exit_75(tmp_path, launcher, mode, expected):
    agent = launch(tmp_path, launcher, mode, processes=1)
    _, stderr = agent.communicate(timeout=120)
    assert agent.returncode == expected, stderr


@pytest.mark.e2e
def test_the_trainer_under_the_launcher_stops_on_sigusr2_with_exit_75(tiny_fashion_betons,
                                                                    tmp_path):
    from ffcv_bias.record import runs
    from test_train import train_args
    folder = tmp_path / "runs"
    args = train_args(tiny_fashion_betons, folder, "--training.epochs=30")
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    agent = subprocess.Popen([sys.executable, "-m", "ffcv_bias.train.torchrun",
                              "--nproc_per_node=2", "--standalone", "--monitor-interval=0.1",
                              str(REPO / "train_imagenet.py"), *args], cwd=REPO,
                             env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 600
    while not list(folder.glob(f"*/{runs.CHECKPOINT_FILE}")):
        assert agent.poll() is None and time.time() < deadline, agent.communicate()
        time.sleep(0.2)
    agent.send_signal(signal.SIGUSR2)
    _, stderr = agent.communicate(timeout=300)
    assert agent.returncode == EXIT_PREEMPTED, stderr[-3000:]
    run_dir, = [path for path in folder.iterdir() if path.is_dir()]
    assert "stopped by SIGUSR2; resume from" in stderr
    assert (run_dir / runs.CHECKPOINT_FILE).exists()
    assert not (run_dir / runs.ERROR_FILE).exists() and not runs.is_complete(run_dir)


# ----------------------------------------------------------------------------------------
# 2. dist.timeout; a stop after the current step on every rank
# ----------------------------------------------------------------------------------------

def test_dist_timeout_has_a_compile_proof_default_outside_the_run_id():
    from ffcv_bias.record import runs
    from ffcv_bias.train.config import resolve_config
    base = ["--data.train_dataset=t.beton", "--data.val_dataset=v.beton"]
    default = resolve_config(base)
    assert default["dist"]["timeout"] == distributed.DEFAULT_TIMEOUT_S == 1800
    longer = resolve_config(base + ["--dist.timeout=7200"])
    assert longer["dist"]["timeout"] == 7200
    assert runs.run_id(longer) == runs.run_id(default)
    without_the_key = {**default, "dist": {k: v for k, v in default["dist"].items()
                                           if k != "timeout"}}
    assert runs.run_id(without_the_key) == runs.run_id(default)


@pytest.mark.parametrize("torchrun", [False, True])
def test_the_timeout_reaches_every_process_group(monkeypatch, torchrun):
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: calls.append(("init", backend, kwargs)))
    monkeypatch.setattr(distributed.dist, "new_group",
                        lambda **kwargs: calls.append(("new_group", kwargs)) or "control")
    monkeypatch.setattr(distributed, "pick_device", lambda local_rank: torch.device("cuda", 0))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        if torchrun:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    info = distributed.setup(0, 2, 0, 2, start_group=True, port="29500", timeout_s=2700)
    (_, backend, init_kwargs), (_, group_kwargs) = calls
    assert backend == "nccl" and init_kwargs["timeout"] == timedelta(seconds=2700)
    assert group_kwargs == {"backend": "gloo", "timeout": timedelta(seconds=2700)}
    assert info.control_group == "control"


def test_the_trainer_passes_dist_timeout_to_setup(monkeypatch, tmp_path):
    from ffcv_bias.train import launch
    from ffcv_bias.train.config import resolve_config
    nested = resolve_config(["--data.train_dataset=t.beton", "--data.val_dataset=v.beton",
                             "--dist.timeout=3600"])
    seen = {}

    class Stop(Exception):
        pass

    def fake_setup(*args, **kwargs):
        seen.update(kwargs)
        raise Stop()

    monkeypatch.setattr(distributed, "setup", fake_setup)
    with pytest.raises(Stop):
        launch.train_worker(0, nested, tmp_path, ["cmd"], owns_run_dir=False)
    assert seen["timeout_s"] == 3600


def run_steps(checks, steps, epoch=0, before_step=None, loss_at=None):
    """Drive StepChecks as the loop does; the step it raised at (or None) and the error."""
    for step in range(steps):
        if before_step:
            before_step(step)
        checks.record(step, torch.tensor(loss_at(step) if loss_at else 1.0))
        try:
            checks.after_step(step, epoch)
        except (Preempted, NonFiniteLossError) as error:
            return step, error
    return None, None


def test_alone_a_stop_comes_after_the_current_step_between_gpu_checks():
    stop = SimpleNamespace(requested=False)
    checks = StepChecks(60, device=CPU, info=ALONE, stop=stop, check_every=25)

    def signal_at_step_3(step):
        stop.requested = stop.requested or step == 3

    step, error = run_steps(checks, 60, before_step=signal_at_step_3)
    assert (step, type(error)) == (3, Preempted)


def test_without_a_scaler_the_first_non_finite_loss_ends_the_run_at_the_next_check():
    checks = StepChecks(60, device=CPU, info=ALONE, stop=SimpleNamespace(requested=False),
                        check_every=25)
    step, error = run_steps(checks, 60, epoch=4,
                            loss_at=lambda step: float("inf") if step == 7 else 1.0)
    assert step == 24 and str(error) == "non-finite loss at epoch 4 step 7"


# Two gloo processes: each runs the same scenarios on its own rank; the parent compares.

def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 1), torch.nn.BatchNorm2d(5))


def _bn_batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(8, 3, 6, 6, generator=generator) * (1 + rank) + 2 * rank
            for _ in range(3)]


def _gloo_scenarios(rank, port, out):
    torch.set_num_threads(1)
    info = distributed.setup(rank, 2, rank, 2, start_group=True, address="127.0.0.1",
                             port=str(port), timeout_s=120)
    results = {}
    try:
        # Rank 1 alone is told to stop during step 2; the loss is checked every 5 steps.
        stop = SimpleNamespace(requested=False)

        def signal_rank_1(step):
            stop.requested = stop.requested or (rank == 1 and step == 2)

        checks = StepChecks(12, device=CPU, info=info, stop=stop, check_every=5)
        step, error = run_steps(checks, 12, before_step=signal_rank_1)
        results["stop"] = (step, type(error).__name__)
        # Rank 0 alone sees an infinite loss at step 7: both fail at the check after it.
        checks = StepChecks(12, device=CPU, info=info, stop=SimpleNamespace(requested=False),
                            check_every=5)
        step, error = run_steps(checks, 12, loss_at=lambda step: float("inf")
                                if (rank, step) == (0, 7) else 1.0)
        results["nonfinite"] = (step, str(error))
        model = _bn_model()
        recompute_bn_statistics(model, _bn_batches(rank),
                                all_reduce=lambda tensor: distributed.all_reduce(tensor, info))
        results["bn"] = {name: value.clone() for name, value in model.state_dict().items()
                         if "running" in name or "num_batches" in name}
    finally:
        distributed.cleanup(info)
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_gloo_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    torch.multiprocessing.start_processes(_gloo_scenarios, args=(free_port(), str(out)),
                                          nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_every_rank_stops_after_the_step_one_rank_was_signalled_in(two_gloo_ranks):
    # Not at step 4, the next loss check: the stop vote comes after every step.
    assert [ranks["stop"] for ranks in two_gloo_ranks] == [(2, "Preempted")] * 2


def test_every_rank_fails_together_on_one_ranks_non_finite_loss(two_gloo_ranks):
    assert [ranks["nonfinite"] for ranks in two_gloo_ranks] == \
        [(9, "non-finite loss at epoch 0 step 7")] * 2


def test_batchnorm_recompute_over_two_ranks_equals_one_process_over_their_union(
        two_gloo_ranks):
    union = _bn_model()
    recompute_bn_statistics(union, _bn_batches(0) + _bn_batches(1))
    expected = {name: value for name, value in union.state_dict().items()
                if "running" in name or "num_batches" in name}
    rank0_alone = _bn_model()
    recompute_bn_statistics(rank0_alone, _bn_batches(0))
    for ranks in two_gloo_ranks:
        assert set(ranks["bn"]) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(ranks["bn"][name], value, rtol=1e-5, atol=1e-6)
    # What the ranks computed before: rank 0's shard alone, broadcast over the others' work.
    assert not torch.allclose(rank0_alone.state_dict()["1.running_mean"],
                              expected["1.running_mean"])
    assert int(expected["1.num_batches_tracked"]) == 6


@pytest.mark.parametrize("group_running", [False, True])
def test_the_trainer_all_reduces_its_recomputed_statistics_in_a_group(monkeypatch,
                                                                       group_running):
    from contextlib import nullcontext
    from ffcv_bias.train import loop
    seen = {}
    monkeypatch.setattr(loop, "recompute_bn_statistics",
                        lambda model, batches, all_reduce=None: seen.update(reduce=all_reduce))
    summed = []
    monkeypatch.setattr(distributed, "all_reduce", lambda tensor, info: summed.append(info))
    info = SimpleNamespace(group_running=group_running)
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(training=SimpleNamespace(bn_recompute_batches=2, epochs=3)),
        info=info, model=None, training_inputs=lambda epoch, count: [],
        forked_rng=nullcontext, autocast=nullcontext)
    loop.Trainer.recompute_batchnorm(trainer)
    assert (seen["reduce"] is not None) == group_running
    if group_running:
        seen["reduce"](torch.zeros(1))
        assert summed == [info]


# ----------------------------------------------------------------------------------------
# 3. fp16: the scaler skips overflowing steps; only a lasting non-finite loss ends the run
# ----------------------------------------------------------------------------------------

def test_with_a_scaler_a_passing_overflow_is_skipped_not_fatal():
    checks = StepChecks(60, device=CPU, info=ALONE, stop=SimpleNamespace(requested=False),
                        check_every=25, scaled=True)
    bad = {7, 30, 31, 32}
    step, error = run_steps(checks, 60, loss_at=lambda step: float("nan") if step in bad
                            else 2.0)
    assert (step, error) == (None, None)
    mean, skipped = checks.mean_loss()
    assert mean == 2.0 and skipped == len(bad)  # the epoch's mean over its finite losses


def test_with_a_scaler_a_loss_non_finite_steps_in_a_row_ends_the_run_across_epochs():
    stop = SimpleNamespace(requested=False)
    first = StepChecks(30, device=CPU, info=ALONE, stop=stop, check_every=25, scaled=True)
    # The last 10 steps of an epoch, then the first 15 of the next: 25 in a row.
    step, error = run_steps(first, 30, loss_at=lambda step: float("inf") if step >= 20 else 1.0)
    assert (step, error) == (None, None)
    second = StepChecks(30, device=CPU, info=ALONE, stop=stop, check_every=25, scaled=True,
                        streak=first.streak)
    step, error = run_steps(second, 30, epoch=1,
                            loss_at=lambda step: float("inf") if step < 20 else 1.0)
    assert step == 24 and isinstance(error, NonFiniteLossError)
    assert str(error).startswith(f"non-finite loss on {NONFINITE_LOSS_STEPS} steps in a row, "
                                 f"up to epoch 1 step 14 ")


def trainer_with_a_scaler(model, loss_fn, scaler, optimizer):
    return SimpleNamespace(
        info=SimpleNamespace(group_running=False), optimizer=optimizer, device=CPU,
        amp_dtype=None, scaler=scaler, ddp_model=model, train_loss_fn=loss_fn,
        clip_gradients=lambda: None, cfg=None)


def test_the_scaler_path_skips_an_overflowing_step_without_reading_the_host(monkeypatch):
    """GradScaler('cpu') + the fused SGD the trainer picks under fp16: an inf loss leaves
    the weights as they were (the step skipped, the scale halved), a finite one trains, and
    scaler.step never asks the host (Tensor.item: a GPU sync on CUDA)."""
    from ffcv_bias.train import loop
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    poison = {"on": True}

    def loss_fn(logits, targets):
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss * float("inf") if poison["on"] else loss

    trainer = trainer_with_a_scaler(model, loss_fn, scaler, optimizer)
    images = torch.randint(0, 255, (4, 3, 2, 2), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    real_item = torch.Tensor.item
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    loss = loop.Trainer.train_step(trainer, images, labels, 0.1)
    assert not torch.isfinite(loss) and reads == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert real_item(scaler._scale) == 512.0  # halved for the next step
    poison["on"] = False
    loop.Trainer.train_step(trainer, images, labels, 0.1)
    assert reads == []
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_for_each_optimizer_would_read_the_host_at_every_scaled_step(monkeypatch):
    """Why fp16 uses the fused kernel: with the for-each SGD, scaler.step reads its inf
    check with Tensor.item (on CUDA, a wait for the GPU at every step)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    real_item = torch.Tensor.item
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    scaler.step(optimizer)
    assert reads


@pytest.mark.parametrize("scaled", [False, True])
def test_fp16_trains_with_the_fused_optimizer(scaled):
    from ffcv_bias.train import loop
    from ffcv_bias.train.config import resolve_config, run_config
    from ffcv_bias.train.models import create_model
    cfg = run_config(resolve_config(["--data.train_dataset=t.beton",
                                     "--data.val_dataset=v.beton", "--model.arch=resnet8"]))
    trainer = SimpleNamespace(cfg=cfg, model=create_model("resnet8", 10),
                              scaler=object() if scaled else None)
    optimizer, _ = loop.Trainer.create_optimizer(trainer)
    assert bool(optimizer.defaults.get("fused")) == scaled


# ----------------------------------------------------------------------------------------
# 4. The label-preservation study copies batches inside the pipeline
# ----------------------------------------------------------------------------------------

def test_preservation_loader_copies_to_the_gpu_right_after_to_tensor(tiny_fashion_betons):
    from ffcv_bias.studies.preservation.evaluation import CropLoader

    def names(loader, field):
        return [type(op).__name__ for op in loader.loader.loader.pipeline_specs[field].transforms]

    def build(device):  # built, not iterated: no GPU needed
        return CropLoader(tiny_fashion_betons[1], resolution=28, batch_size=32, seed=0,
                          smallest_alpha=0.5, num_workers=1, device=device)

    on_gpu = build(torch.device("cuda", 0))
    assert names(on_gpu, "image") == ["ToTensor", "ToDevice", "ToTorchImage"]
    assert names(on_gpu, "label") == ["ToTensor", "Squeeze", "ToDevice"]
    for device in (None, CPU):
        assert names(build(device), "image") == ["ToTensor", "ToTorchImage"]


def test_evaluate_split_gives_its_device_to_the_loader(monkeypatch):
    from ffcv_bias.studies.preservation import evaluation
    seen = {}

    class Built(Exception):
        pass

    def fake_loader(*args, **kwargs):
        seen.update(kwargs)
        raise Built()

    monkeypatch.setattr(evaluation, "CropLoader", fake_loader)
    with pytest.raises(Built):
        evaluation.evaluate_split(None, "x.beton", split="val", settings={"crop": (1.0,)},
                                  draws=1, seed=0, resolution=28, batch_size=8, num_workers=1,
                                  device=torch.device("cuda", 0), autocast=None, num_classes=10)
    assert seen["device"] == torch.device("cuda", 0)


# ----------------------------------------------------------------------------------------
# 6. bench/gpu_check.py: syncs of steps apart from those of epochs' ends
# ----------------------------------------------------------------------------------------

def gpu_check_module():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check
    return gpu_check


class FakeTrainer:
    """Warns like torch.cuda.set_sync_debug_mode: one sync per loss check (every 25 steps
    and at the last), one more at the epoch's end; the loader thread syncs per batch."""

    def __init__(self, steps):
        self.train_loader = FakeLoader(steps)

    def train_epoch(self, epoch):
        steps = len(self.train_loader)
        for step, _ in enumerate(self.train_loader):
            if (step + 1) % 25 == 0 or step + 1 == steps:
                warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("called a synchronizing CUDA operation")  # the mean loss


class FakeLoader:
    def __init__(self, steps):
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        import threading
        for step in range(self.steps):
            thread = threading.Thread(
                target=lambda: warnings.warn("called a synchronizing CUDA operation"))
            thread.start()
            thread.join()
            yield step


def test_gpu_check_counts_step_syncs_apart_from_the_epochs_ends():
    gpu_check = gpu_check_module()
    # The default sizes: 6,000 images / batch 512 = 11 steps per epoch, 14 epochs.
    seconds, phases, other = gpu_check.timed_epochs_with_syncs(FakeTrainer(11), 14, CPU)
    assert phases == (0, 140, 28, 14) and other == 14 * 11
    report = gpu_check.Report()
    gpu_check.report_syncs(report, phases, other)
    assert report.results[-1]["status"] == "PASS"
    # Long epochs: the periodic checks are the steps' own, 1 in 25.
    _, phases, _ = gpu_check.timed_epochs_with_syncs(FakeTrainer(100), 2, CPU)
    step_syncs, steps, epoch_syncs, epochs = phases
    assert (step_syncs, steps, epoch_syncs, epochs) == (6, 198, 4, 2)
    assert gpu_check.sync_phases([[0, 0, 1]], [3]) == (1, 2, 2, 1)


def test_a_trainer_that_syncs_at_every_step_fails_the_check():
    gpu_check = gpu_check_module()
    report = gpu_check.Report()
    gpu_check.report_syncs(report, gpu_check.sync_phases([list(range(11))] * 3, [12] * 3), 0)
    assert report.results[-1]["status"] == "FAIL"


def test_resnet50_figures_stand_beside_ffcv_imagenets_reference(monkeypatch):
    gpu_check = gpu_check_module()
    monkeypatch.setattr(gpu_check, "model_images_per_second",
                        lambda options, device, resolution, compiled: {False: (1500.0, 20.0),
                                                                      True: (3300.0, 20.0)})
    options = SimpleNamespace(resolution_list=[160], compile=False, arch="resnet50",
                              batch=256, compile_backend="inductor")
    report = gpu_check.Report()
    gpu_check.check_model_throughput(options, report, CPU)
    figures = [entry for entry in report.results if entry["status"] == "INFO"]
    assert [entry["reference_images_per_second"] for entry in figures] == [3000, 3000]
    assert "(0.50x)" in figures[0]["detail"] and "(1.10x)" in figures[1]["detail"]
    assert "78.1% top-1" in figures[0]["detail"]
