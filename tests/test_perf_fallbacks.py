"""Each measured speed-up keeps working (or steps aside) when the internals it relies on change:
torch's private ELU op, glibc, the shared-memory all-reduce's requirements, and the private Ray
logger name. No Ray is started and no process group is created."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import types

import pytest
import torch
from torch import nn

import raytrain_vae.perf.elu as elu
from raytrain_vae import runtime
from raytrain_vae.data.source import DataError
from raytrain_vae.perf import heap, shm_allreduce
from raytrain_vae.runtime import quiet_train_report_log

FAST_GRAD_FN = "_ELUFromExpBackward"


@pytest.fixture
def fresh_elu_check():
    """fast_elu_works() is cached: check afresh in the test, and forget its answer after."""
    elu.fast_elu_works.cache_clear()
    try:
        yield
    finally:
        elu.fast_elu_works.cache_clear()


def _x() -> torch.Tensor:
    # Both signs, zero, and values where exp(x) - 1 and expm1 differ the most.
    return torch.tensor(
        [[-6.0, -2.5, -1.0, -1e-4, 0.0, 1e-4, 0.5, 3.0]], dtype=torch.float32, requires_grad=True
    )


def _elu_and_grad(fn) -> tuple[torch.Tensor, torch.Tensor, torch.autograd.graph.Node]:
    x = _x()
    y = fn(x)
    (grad,) = torch.autograd.grad((y * torch.arange(1.0, 9.0)).sum(), x)
    return y.detach(), grad, y.grad_fn


def _assert_matches_torch(fn) -> torch.autograd.graph.Node:
    y, grad, grad_fn = _elu_and_grad(fn)
    want_y, want_grad, _ = _elu_and_grad(nn.functional.elu)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(grad, want_grad)
    return grad_fn


def _raises(grad, y):
    raise AttributeError("'_OpNamespace' 'aten' object has no attribute 'elu_backward'")


def _zeros(grad, y):
    return torch.zeros_like(grad)


@pytest.mark.parametrize("broken_op", [_raises, _zeros], ids=["op-removed", "op-wrong"])
def test_a_changed_private_op_falls_back_to_torch_elu(monkeypatch, fresh_elu_check, broken_op):
    monkeypatch.setattr(elu, "_elu_backward_from_output", broken_op)
    assert elu.fast_elu_works() is False
    grad_fn = _assert_matches_torch(elu.ELU())
    assert type(grad_fn).__name__ != FAST_GRAD_FN
    assert "Elu" in type(grad_fn).__name__  # torch's own ELU backward


def test_the_fast_elu_is_used_here_and_matches_torch(fresh_elu_check):
    assert elu.fast_elu_works() is True
    grad_fn = _assert_matches_torch(elu.ELU())
    assert type(grad_fn).__name__ == FAST_GRAD_FN


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_the_check_works_when_first_called_without_grad(fresh_elu_check, mode):
    # Sampling and evaluation may be the first to build the model and call the check.
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        assert elu.fast_elu_works() is True
        out = elu.ELU()(torch.linspace(-2, 2, 5))
    torch.testing.assert_close(out, nn.functional.elu(torch.linspace(-2, 2, 5)))
    grad_fn = _assert_matches_torch(elu.ELU())
    assert type(grad_fn).__name__ == FAST_GRAD_FN


def test_inputs_the_fast_path_does_not_take_use_torch_elu(fresh_elu_check):
    assert elu.fast_elu_works() is True
    for module, dtype in ((elu.ELU(alpha=0.5), torch.float32), (elu.ELU(), torch.bfloat16)):
        x = _x().detach().to(dtype).requires_grad_()
        y = module(x)
        assert type(y.grad_fn).__name__ != FAST_GRAD_FN
        torch.testing.assert_close(y, nn.functional.elu(x.detach(), alpha=module.alpha))


# --- heap ---------------------------------------------------------------------------------------


def test_retain_freed_memory_is_false_when_libc_cannot_be_opened(monkeypatch):
    def no_libc(name):
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(heap.ctypes, "CDLL", no_libc)
    assert heap.retain_freed_memory() is False


def _fake_glibc(mallopt_result: int | None) -> types.SimpleNamespace:
    calls = []
    libc = types.SimpleNamespace(gnu_get_libc_version=lambda: b"2.99", calls=calls)
    if mallopt_result is not None:

        def mallopt(param, value):
            calls.append((param, value))
            return mallopt_result

        libc.mallopt = mallopt
    return libc


def test_retain_freed_memory_is_false_without_mallopt(monkeypatch):
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: _fake_glibc(None))
    assert heap.retain_freed_memory() is False


@pytest.mark.parametrize("result, took", [(1, True), (0, False)])
def test_retain_freed_memory_reports_whether_mallopt_took(monkeypatch, result, took):
    libc = _fake_glibc(result)
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: libc)
    assert heap.retain_freed_memory() is took
    assert libc.calls[0] == (heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD_BYTES)
    if took:
        assert libc.calls == [
            (heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD_BYTES),
            (heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD_BYTES),
            (heap.M_TOP_PAD, heap.TOP_PAD_BYTES),
        ]


def test_the_real_libc_exports_what_retain_freed_memory_reads():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018
    except AttributeError:
        pytest.skip("not glibc")
    assert callable(libc.mallopt)


# --- shared-memory all-reduce -------------------------------------------------------------------


class FakeDist:
    """The torch.distributed calls shared_memory_all_reduce makes, as seen by rank 0 of `world`
    ranks: no process group. others_ok: whether every other rank mapped the shared file."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, world: int = 2, others_ok: bool = True) -> None:
        self.world, self.others_ok = world, others_ok
        self.paths: list[str] = []

    def get_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return self.world

    def broadcast_object_list(self, objects: list, src: int) -> None:
        assert src == 0
        self.paths.extend(objects)

    def barrier(self) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor, op) -> None:
        assert op == torch.distributed.ReduceOp.MIN
        if not self.others_ok:
            tensor.zero_()


@pytest.fixture
def rank_zero(monkeypatch, tmp_path):
    """Rank 0 of two on an x86-64 host whose shared-memory folder is tmp_path."""
    fake = FakeDist()
    monkeypatch.setattr(shm_allreduce, "dist", fake)
    monkeypatch.setattr(shm_allreduce, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(shm_allreduce.platform, "machine", lambda: "x86_64")
    return fake


def test_with_everything_in_place_rank_zero_gets_a_hook(rank_zero, tmp_path):
    # The control for the cases below: the fakes are enough for the shared path to be taken.
    reducer = shm_allreduce.shared_memory_all_reduce(num_gradients=10, all_local=True)
    assert isinstance(reducer, shm_allreduce.SharedMemoryAllReduce)
    assert (reducer.rank, reducer.world, reducer.capacity) == (0, 2, 10)
    assert os.path.dirname(rank_zero.paths[0]) == str(tmp_path)
    assert os.listdir(tmp_path) == []  # unlinked once every rank has it mapped


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64"])
def test_weakly_ordered_machines_keep_gloo(rank_zero, monkeypatch, tmp_path, machine):
    monkeypatch.setattr(shm_allreduce.platform, "machine", lambda: machine)
    assert shm_allreduce.shared_memory_all_reduce(num_gradients=10, all_local=True) is None
    assert os.listdir(tmp_path) == []


def test_upper_case_machine_names_are_recognised(rank_zero, monkeypatch):
    monkeypatch.setattr(shm_allreduce.platform, "machine", lambda: "AMD64")
    assert shm_allreduce.shared_memory_all_reduce(num_gradients=10, all_local=True) is not None


def test_no_shared_memory_folder_keeps_gloo(rank_zero, monkeypatch, tmp_path):
    monkeypatch.setattr(shm_allreduce, "SHM_DIR", str(tmp_path / "no-dev-shm"))
    assert shm_allreduce.shared_memory_all_reduce(num_gradients=10, all_local=True) is None
    assert not (tmp_path / "no-dev-shm").exists()


def test_ranks_on_several_hosts_keep_gloo(rank_zero, tmp_path):
    assert shm_allreduce.shared_memory_all_reduce(num_gradients=10, all_local=False) is None
    assert os.listdir(tmp_path) == []


def test_a_single_rank_needs_no_hook(rank_zero, tmp_path):
    rank_zero.world = 1
    assert shm_allreduce.shared_memory_all_reduce(num_gradients=10, all_local=True) is None
    assert os.listdir(tmp_path) == []


def test_a_full_shared_memory_folder_keeps_gloo(rank_zero, monkeypatch, tmp_path):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_allreduce.os, "posix_fallocate", full)
    assert shm_allreduce.shared_memory_all_reduce(num_gradients=10, all_local=True) is None
    assert os.listdir(tmp_path) == []  # the half-made file is not left behind


def test_another_rank_failing_to_map_makes_rank_zero_keep_gloo(rank_zero, tmp_path):
    rank_zero.others_ok = False
    assert shm_allreduce.shared_memory_all_reduce(num_gradients=10, all_local=True) is None
    assert os.listdir(tmp_path) == []


# --- private Ray logger name ---------------------------------------------------------------------


@pytest.fixture
def report_module():
    """Ray's private module that logs every ray.train.report; its logger's level is restored."""
    module = importlib.import_module(runtime.TRAIN_REPORT_MODULE)  # fails loudly if renamed
    level = module.logger.level
    try:
        yield module
    finally:
        module.logger.setLevel(level)


def test_train_report_logger_name_is_rays_logger(report_module):
    # Fails loudly when Ray moves its logger or names it otherwise.
    assert isinstance(report_module.logger, logging.Logger)
    assert runtime.train_report_logger_name() == report_module.logger.name
    assert logging.getLogger(runtime.train_report_logger_name()) is report_module.logger


@pytest.mark.parametrize("level", ["WARNING", "DEBUG"])
def test_quiet_train_report_log_sets_rays_logger(report_module, level):
    quiet_train_report_log(level)
    assert report_module.logger.level == logging.getLevelName(level)
    assert report_module.logger.isEnabledFor(logging.INFO) is (level == "DEBUG")
    assert report_module.logger.isEnabledFor(logging.WARNING)


@pytest.mark.parametrize(
    "missing", ["ray.train.v2._internal.execution.no_such_module", "no_such_package.context"]
)
def test_a_renamed_ray_module_leaves_the_lines_showing(monkeypatch, report_module, missing):
    monkeypatch.setattr(runtime, "TRAIN_REPORT_MODULE", missing)
    assert runtime.train_report_logger_name() is None
    level = report_module.logger.level
    quiet_train_report_log("WARNING")  # no error, and nothing else is touched
    assert report_module.logger.level == level


@pytest.mark.parametrize("name", runtime.RAY_DATA_ERROR_LOGGERS)
def test_ray_data_error_loggers_are_rays_loggers(name):
    # generate quiets these loggers by name; fails loudly when Ray moves or renames them.
    module = importlib.import_module(name)
    assert module.logger is logging.getLogger(name)


@pytest.fixture
def train_fn_error_module():
    """Ray's private module that logs a training function's traceback; our filter is removed
    after the test."""
    module = importlib.import_module(runtime.TRAIN_FN_ERROR_MODULE)  # fails loudly if renamed
    try:
        yield module
    finally:
        module.logger.removeFilter(runtime.USER_ERROR_TRACEBACK)


def logged(module, exc: Exception, caplog) -> list[str]:
    """What Ray Train logs of this exception, raised from a training function."""
    caplog.clear()
    try:
        raise exc
    except Exception as raised:
        module.construct_user_exception_with_traceback(raised)
    return [
        r.getMessage() for r in caplog.records if "Error in training function" in r.getMessage()
    ]


def test_a_user_error_in_a_training_function_logs_no_traceback(train_fn_error_module, caplog):
    # Fails loudly when Ray moves the logger or the call that logs the traceback.
    assert train_fn_error_module.logger is logging.getLogger(runtime.TRAIN_FN_ERROR_MODULE)
    caplog.set_level(logging.ERROR, logger=runtime.TRAIN_FN_ERROR_MODULE)
    bad_file = DataError("x.png: truncated")
    assert "Traceback" in logged(train_fn_error_module, bad_file, caplog)[0]
    runtime.quiet_user_error_tracebacks(retried=False)
    runtime.quiet_user_error_tracebacks(retried=False)  # once per process, however often called
    assert train_fn_error_module.logger.filters.count(runtime.USER_ERROR_TRACEBACK) == 1
    assert logged(train_fn_error_module, bad_file, caplog) == []
    assert "Traceback" in logged(train_fn_error_module, ValueError("a bug of ours"), caplog)[0]
    # Workers that Ray Train restarts say why each attempt failed, in one line.
    runtime.quiet_user_error_tracebacks(retried=True)
    one_line = ["Error in training function: x.png: truncated"]
    assert logged(train_fn_error_module, bad_file, caplog) == one_line
    assert "Traceback" in logged(train_fn_error_module, ValueError("a bug of ours"), caplog)[0]
