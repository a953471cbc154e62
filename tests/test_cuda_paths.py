"""The CUDA, DDP and SLURM code paths (issue 17), tested on the CPU as far as the logic allows.

No GPU runs here: what only a GPU can confirm (pinned buffers, the copy stream's ordering,
NCCL, compile speed, contexts on GPU 0) is measured by bench/gpu_check.sh. Here:
- resume: the checkpoint is read to the CPU and the RNG states restore from it (item 1);
- rendezvous: a free port per spawned run, passed to every worker (item 2);
- pipelines: ToDevice after ToTensor on CUDA, none on CPU; a batch read after the loader
  moved on is another batch (why the copy must happen in the pipeline); the loader thread
  waits for a slot's copy and selects its GPU (items 3 and 9);
- deterministic mode is strict (item 4); SIGUSR2 stops like SIGTERM (item 7); the
  checkpoint is written before any rank leaves (item 8);
- SLURM resources, loader threads per CPU share (items 6 and 11);
- training.compile and training.fused_optimizer: recorded, off by default, run_ids of
  finished runs unchanged (item 10).
"""
import json
import os
import signal
import socket
import time
from types import SimpleNamespace

import pytest
import torch

from test_train import REPO, run_dir_of, train_args, train_subprocess
from ffcv_bias.train import distributed, launch, loop
from ffcv_bias.train import state as train_state
from ffcv_bias.train.optimizer import build_optimizer
from ffcv_bias.record import runs
from ffcv_bias.data import ffcv_patches
from ffcv_bias.sweep import slurm as slurm_backend
from ffcv_bias.sweep.runner import TrainerPool, loader_thread_args
from ffcv_bias.sweep.spec import SlurmSettings, SweepError
from ffcv_bias.common.errors import EXIT_OK, EXIT_PREEMPTED
from ffcv_bias.train.config import resolve_config


# ----------------------------------------------------------------------------------------
# 1. Resume: checkpoint to the CPU, RNG states restored
# ----------------------------------------------------------------------------------------

def test_checkpoint_is_read_to_the_cpu_whatever_the_run_device(tmp_path, monkeypatch):
    """The RNG states must come back as CPU ByteTensors: torch.set_rng_state refuses any
    other (on CUDA, map_location=device made every resume crash)."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"rng": [train_state.rng_state(torch.device("cpu"))]}, path)
    seen = {}
    real_load = torch.load

    def spying_load(*args, **kwargs):
        seen["map_location"] = kwargs.get("map_location")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    state = train_state.read_checkpoint(path)
    assert seen["map_location"] == "cpu"
    rng = state["rng"][0]
    assert rng["torch"].device.type == "cpu" and rng["torch"].dtype == torch.uint8
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    saved = train_state.rng_state(torch.device("cpu"))
    torch.rand(3)
    train_state.set_rng_state(saved, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_loaded_to_another_device_is_refused_by_torch_rng(tmp_path):
    """The defect itself, on the meta device (no GPU needed): a map_location other than the
    CPU gives RNG tensors torch.set_rng_state cannot take."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"rng": train_state.rng_state(torch.device("cpu"))}, path)
    moved = torch.load(path, map_location="meta", weights_only=True)
    with pytest.raises((TypeError, RuntimeError, NotImplementedError)):
        torch.set_rng_state(moved["rng"]["torch"])
    assert train_state.read_checkpoint(path)["rng"]["torch"].device.type == "cpu"


# ----------------------------------------------------------------------------------------
# 2. Rendezvous port
# ----------------------------------------------------------------------------------------

def test_auto_port_is_free_and_differs_while_the_first_is_taken():
    first = distributed.rendezvous_port("auto")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(first)))
        holder.listen()
        second = distributed.rendezvous_port("auto")
    assert first.isdigit() and second.isdigit() and first != second
    assert distributed.rendezvous_port("29500") == "29500"
    with pytest.raises(ValueError, match="dist.port='http' must be 'auto' or a port"):
        distributed.rendezvous_port("http")


def test_spawned_workers_all_get_the_parents_free_port(tiny_fashion_betons, tmp_path,
                                                      monkeypatch):
    args = train_args(tiny_fashion_betons, tmp_path, "--dist.world_size=2")
    nested = resolve_config(args)
    assert nested["dist"]["port"] == "auto"
    spawned = []
    monkeypatch.setattr(distributed, "spawn",
                        lambda worker, size, worker_args: spawned.append(worker_args))
    for _ in range(2):
        assert launch.launch_spawned(nested, run_dir_of(args), ["cmd"]) == EXIT_OK
    ports = [worker_args[0]["dist"]["port"] for worker_args in spawned]
    assert all(port.isdigit() and port != "12355" for port in ports)
    assert nested["dist"]["port"] == "auto"  # the caller's config is not modified


# ----------------------------------------------------------------------------------------
# 3 and 9. Pipelines per device; the buffer race; ffcv's loader thread
# ----------------------------------------------------------------------------------------

def transform_names(loader, field):
    return [type(op).__name__ for op in loader.loader.pipeline_specs[field].transforms]


@pytest.mark.parametrize("make", ["train", "val"])
def test_cuda_pipelines_copy_to_the_device_right_after_to_tensor(tiny_fashion_betons, make):
    from ffcv_bias.data.loaders import create_train_loader, create_val_loader
    train_beton, val_beton = tiny_fashion_betons

    def build(device):
        if make == "train":
            return create_train_loader(train_beton, batch_size=32, resolution=28, seed=0,
                                       num_workers=1, device=device)
        return create_val_loader(val_beton, batch_size=32, resolution=28, num_workers=1,
                                 device=device)

    on_gpu = build(torch.device("cuda", 1))  # built, not iterated: no GPU needed
    assert transform_names(on_gpu, "image") == ["ToTensor", "ToDevice", "ToTorchImage"]
    assert transform_names(on_gpu, "label") == ["ToTensor", "Squeeze", "ToDevice"]
    copies = [op for field in ("image", "label")
              for op in on_gpu.loader.pipeline_specs[field].transforms
              if type(op).__name__ == "ToDevice"]
    assert all(op.device == torch.device("cuda", 1) and op.non_blocking for op in copies)
    for device in (None, "cpu", torch.device("cpu")):
        on_cpu = build(device)
        assert transform_names(on_cpu, "image") == ["ToTensor", "ToTorchImage"]
        assert transform_names(on_cpu, "label") == ["ToTensor", "Squeeze"]


def test_a_batch_read_after_the_loader_moved_on_is_another_batch(tiny_fashion_betons):
    """The race of item 3 with a forced-asynchronous stand-in for the GPU copy: a copy that
    reads the yielded host buffer `lag` batches later (a GPU that far behind) reads pixels
    the loader has since decoded for another batch, while the labels (copied at yield)
    stay this batch's. Read at yield time (what the copy in the pipeline does, on the
    slot's stream before the slot is handed out again) every batch is its own."""
    from ffcv_bias.data.loaders import create_train_loader
    loader = create_train_loader(tiny_fashion_betons[0], batch_size=32, resolution=28, seed=0,
                                 num_workers=1, batches_ahead=3)

    def fingerprints(lag):
        pending, mismatched = [], 0
        for images, labels in loader:
            pending.append((images, images.sum().item()))  # buffer + fingerprint at yield
            if len(pending) > lag:
                buffer, at_yield = pending.pop(0)
                mismatched += buffer.sum().item() != at_yield  # the deferred "copy"
        return mismatched, len(loader)

    assert fingerprints(lag=0)[0] == 0
    mismatched, batches = fingerprints(lag=6)  # > batches_ahead + 2 slots
    assert mismatched >= batches - 7 - 1, (mismatched, batches)


class FakeEvent:
    log = []

    def record(self, stream):
        self.stream = stream
        FakeEvent.log.append(("record", stream.slot))

    def synchronize(self):
        FakeEvent.log.append(("wait", self.stream.slot))


def test_loader_thread_waits_for_a_slots_copy_before_decoding_into_it(monkeypatch):
    from ffcv.loader import epoch_iterator
    monkeypatch.setattr(epoch_iterator, "IS_CUDA", True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    decoded = []
    monkeypatch.setattr(ffcv_patches, "_ORIGINAL_RUN_PIPELINE",
                        lambda self, b_ix, ixes, slot, event: decoded.append(slot) or slot)
    FakeEvent.log = []
    iterator = SimpleNamespace(cuda_streams=[SimpleNamespace(slot=i) for i in range(2)])
    for b_ix, slot in enumerate([0, 1, 0, 1]):
        FakeEvent.log.append(("decode", slot))
        ffcv_patches._run_pipeline_after_slot_copy(iterator, b_ix, [b_ix], slot, None)
    assert decoded == [0, 1, 0, 1]
    assert FakeEvent.log == [("decode", 0), ("record", 0), ("decode", 1), ("record", 1),
                             ("decode", 0), ("wait", 0), ("record", 0),
                             ("decode", 1), ("wait", 1), ("record", 1)]


def test_loader_thread_selects_its_streams_gpu_first(monkeypatch):
    from ffcv.loader import epoch_iterator
    calls = []
    monkeypatch.setattr(ffcv_patches, "_ORIGINAL_RUN", lambda self: calls.append("run"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    iterator = SimpleNamespace(cuda_streams=[SimpleNamespace(device=torch.device("cuda", 3))])
    monkeypatch.setattr(epoch_iterator, "IS_CUDA", True)
    ffcv_patches._run_on_streams_device(iterator)
    assert calls == [torch.device("cuda", 3), "run"]
    calls.clear()
    monkeypatch.setattr(epoch_iterator, "IS_CUDA", False)
    ffcv_patches._run_on_streams_device(SimpleNamespace(cuda_streams=[None]))
    assert calls == ["run"]


def test_patches_are_installed_on_ffcvs_epoch_iterator():
    import ffcv_bias.data.loaders  # noqa: F401 - applies the patches
    from ffcv.loader.epoch_iterator import EpochIterator
    assert EpochIterator.run is ffcv_patches._run_reporting_errors
    assert EpochIterator.run_pipeline is ffcv_patches._run_pipeline_after_slot_copy


# ----------------------------------------------------------------------------------------
# 4, 7, 8. Strict determinism, SIGUSR2, checkpoint before leaving
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deterministic_mode_raises_instead_of_warning(device):
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        train_state.set_determinism(torch.device(device), 1)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        train_state.set_determinism(torch.device("cpu"), 0)  # CPU runs are deterministic anyway
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2:]


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR2])
def test_stop_request_takes_sigusr2_like_sigterm(number):
    with train_state.StopRequest() as stop:
        os.kill(os.getpid(), number)
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == signal.Signals(number).name
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


def test_sigusr2_stops_a_trainer_with_exit_75_and_a_checkpoint(tiny_fashion_betons, tmp_path):
    args = train_args(tiny_fashion_betons, tmp_path, "--training.epochs=30")
    run_dir = run_dir_of(args)
    child = train_subprocess(args)
    deadline = time.time() + 300
    while not (run_dir / runs.CHECKPOINT_FILE).exists():
        assert child.poll() is None and time.time() < deadline, child.communicate()
        time.sleep(0.2)
    child.send_signal(signal.SIGUSR2)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == EXIT_PREEMPTED, stderr
    assert stderr.strip().splitlines()[-1] == \
        f"stopped by SIGUSR2; resume from {run_dir / runs.CHECKPOINT_FILE}"
    assert not (run_dir / runs.ERROR_FILE).exists() and not runs.is_complete(run_dir)


@pytest.mark.parametrize("is_main", [True, False])
def test_every_rank_waits_for_the_checkpoint_before_leaving(monkeypatch, tmp_path, is_main):
    events = []
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, info: [obj, obj])
    monkeypatch.setattr(distributed, "barrier", lambda info: events.append("barrier"))
    monkeypatch.setattr(loop.atomic, "torch_save", lambda path, obj: events.append("save"))
    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(
        info=SimpleNamespace(is_main=is_main, group_running=True), device=torch.device("cpu"),
        run_dir=tmp_path, run_id="r", model=model, scaler=None, train_seconds=0.0,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    loop.Trainer.save_checkpoint(trainer, 1)
    assert events == (["save", "barrier"] if is_main else ["barrier"])


# ----------------------------------------------------------------------------------------
# 6 and 11. SLURM resources, loader threads
# ----------------------------------------------------------------------------------------

def test_a_slurm_sweep_needs_cpus_and_memory():
    for settings, missing in ((SlurmSettings(time=60), "slurm.cpus_per_task and slurm.mem"),
                              (SlurmSettings(time=60, mem="100G"), "slurm.cpus_per_task"),
                              (SlurmSettings(time=60, cpus_per_task=80), "slurm.mem")):
        with pytest.raises(SweepError, match=f"a SLURM sweep needs {missing} "):
            slurm_backend.executor_parameters(settings, "s", None, "slurm")
    params = slurm_backend.executor_parameters(
        SlurmSettings(time=60, cpus_per_task=80, mem="480G"), "s", None, "slurm")
    assert params["cpus_per_task"] == 80 and params["slurm_mem"] == "480G"
    slurm_backend.executor_parameters(SlurmSettings(), "s", None, "local")  # a local trial


def test_every_shipped_slurm_sweep_sets_cpus_and_memory():
    import yaml
    from ffcv_bias.sweep.spec import load_sweep
    with_slurm = [path for path in sorted((REPO / "rn50_configs" / "sweeps").glob("*.yaml"))
                  if "slurm" in yaml.safe_load(path.read_text())]
    assert len(with_slurm) >= 10
    for path in with_slurm:
        sweep = load_sweep(path)
        assert sweep.slurm.cpus_per_task and sweep.slurm.mem, path.name


def planned(num_workers):
    return SimpleNamespace(config_args=["--config-file", "x.yaml"],
                           config={"data": {"num_workers": num_workers}})


def test_each_slot_gets_loader_threads_within_its_cpu_share():
    # 80 CPUs, 8 runs of one process: 10 each, 9 loader threads + the training loop.
    assert loader_thread_args(planned(12), 10) == ["--data.num_workers=9"]  # recipe's 12
    assert loader_thread_args(planned(0), 10) == ["--data.num_workers=9"]   # auto
    assert loader_thread_args(planned(4), 10) == []                        # smaller: kept
    assert loader_thread_args(planned(0), 1) == ["--data.num_workers=1"]
    pool = TrainerPool(train_script="train_imagenet.py", python=["python"])
    assert pool.command(planned(12), threads=10)[-1] == "--data.num_workers=9"
    assert pool.command(planned(12)) == ["python", "train_imagenet.py", "--config-file", "x.yaml"]
    env = pool._child_env(["3"], 10)
    assert env["NUMBA_NUM_THREADS"] == "9" and env["OMP_NUM_THREADS"] == "10"


def test_auto_loader_threads_share_the_cpus_of_the_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(80)))
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    assert train_state.choose_loader_threads(0, 8) == 9
    assert train_state.choose_loader_threads(0, 1) == 79
    assert train_state.choose_loader_threads(12, 8) == 12  # an explicit count is the user's
    monkeypatch.setenv("NUMBA_NUM_THREADS", "4")
    assert train_state.choose_loader_threads(0, 1) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert train_state.choose_loader_threads(0, 2) == 1


# ----------------------------------------------------------------------------------------
# 10. compile, fused optimizers, DDP gradients
# ----------------------------------------------------------------------------------------

def test_new_keys_at_their_defaults_keep_the_run_id(tiny_fashion_betons, tmp_path):
    nested = resolve_config(train_args(tiny_fashion_betons, tmp_path))
    assert (nested["training"]["compile"], nested["training"]["fused_optimizer"],
            nested["training"]["restart"], nested["data"]["num_workers"] >= 0) == (0, 0, 0, True)
    before_the_keys = json.loads(json.dumps(nested))
    for key in ("compile", "fused_optimizer", "restart"):
        del before_the_keys["training"][key]
    assert runs.run_id(nested) == runs.run_id(before_the_keys)
    for key in ("compile", "fused_optimizer"):
        changed = resolve_config(train_args(tiny_fashion_betons, tmp_path, f"--training.{key}=1"))
        assert runs.run_id(changed) != runs.run_id(nested)
    restarted = resolve_config(train_args(tiny_fashion_betons, tmp_path, "--training.restart=1"))
    assert runs.run_id(restarted) == runs.run_id(nested)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_only_when_asked(name):
    training = {"momentum": 0.9, "nesterov": 0, "adam_eps": 1e-8, "adam_beta1": 0.9,
                "adam_beta2": 0.999}
    params = [torch.nn.Parameter(torch.zeros(3))]
    default = build_optimizer(name, [{"params": params}], {**training, "fused_optimizer": 0})
    fused = build_optimizer(name, [{"params": params}], {**training, "fused_optimizer": 1})
    assert not default.defaults.get("fused") and fused.defaults["fused"] is True


def test_compile_wraps_the_training_module_with_room_for_every_resolution():
    import torch._dynamo.config as dynamo_config
    # dynamo's own patch, not monkeypatch: monkeypatch's undo deletes the key from torch's
    # config module, and every later torch.compile in the process then fails.
    with dynamo_config.patch(recompile_limit=2):
        module = torch.nn.Linear(2, 2)
        compiled = loop.compile_for_resolutions(module, list(range(160, 193, 8)))  # 5 sizes
        assert compiled._orig_mod is module  # wrapped, not compiled until called
        assert dynamo_config.recompile_limit == 7


def test_compile_backend_is_passed_to_torch_compile():
    # bench/gpu_check.py --tiny traces the compiled variants with aot_eager on a CPU.
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 2)
    compiled = loop.compile_for_resolutions(module, [32], backend="aot_eager")
    inputs = torch.randn(4, 2)
    assert torch.equal(compiled(inputs), module(inputs))
    with pytest.raises(Exception, match="no_such_backend"):
        loop.compile_for_resolutions(module, [32], backend="no_such_backend")


def test_ddp_keeps_its_gradient_bucket_views(tiny_fashion_betons, tmp_path, monkeypatch):
    """zero_grad(set_to_none=False) under DDP (the bucket views survive), None alone."""
    calls = []
    trainer = SimpleNamespace(
        info=SimpleNamespace(group_running=True), optimizer=SimpleNamespace(
            param_groups=[{}], zero_grad=lambda set_to_none: calls.append(set_to_none),
            step=lambda: None),
        device=torch.device("cpu"), amp_dtype=None, scaler=None,
        ddp_model=lambda x: x.mean(dim=(2, 3)), clip_gradients=lambda: None,
        train_loss_fn=lambda out, target: (out * torch.ones_like(out, requires_grad=True)).sum())
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    loop.Trainer.train_step(trainer, images, torch.zeros(2, dtype=torch.long), 0.1)
    trainer.info.group_running = False
    loop.Trainer.train_step(trainer, images, torch.zeros(2, dtype=torch.long), 0.1)
    assert calls == [False, True]


def test_global_pool_is_adaptive_avg_pool_off_cuda_and_a_mean_in_deterministic_cuda():
    """adaptive_avg_pool2d's CUDA backward has no deterministic kernel (training.deterministic=1
    would stop with an error); elsewhere the models compute exactly what they did."""
    from ffcv_bias.train.models import create_model
    from ffcv_bias.train.models.layers import global_avg_pool
    x = torch.randn(2, 8, 5, 7)
    assert torch.equal(global_avg_pool(x), torch.nn.functional.adaptive_avg_pool2d(x, 1))
    on_meta = torch.randn(2, 8, 5, 7, device="meta")
    assert global_avg_pool(on_meta).shape == (2, 8, 1, 1)
    model = create_model("resnet8", 10)
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules())
