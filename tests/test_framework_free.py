"""Framework knowledge stays in the adapters: the executor reads no trainer state (the adapter
passes the outer wrapper), and the Lightning DDP check reads the public DDP wrapper."""

import inspect

import numpy as np
import pytest

import ww_callbacks.executor as executor
from ww_callbacks import MEMORY_ONLY
from ww_callbacks.controller import WeightWatcherController


@pytest.mark.core
def test_executor_reads_no_framework_state():
    code = [line.split("#")[0] for line in inspect.getsource(executor).splitlines()
            if not line.strip().startswith(("#", "``", ">>>")) and "``" not in line]
    assert not [line for line in code if "_trainer" in line or ".strategy" in line]


@pytest.mark.core
def test_sharding_root_uses_only_the_wrapper_it_is_given():
    class Module:
        pass

    model = Module()
    model._trainer = type("T", (), {"strategy": type("S", (), {"model": object()})()})()
    assert executor.sharding_root(model) is model            # the trainer is not looked at
    assert executor.sharding_root(model, outer=None) is model
    wrapper = Module()
    wrapper.module = model                                   # not an FSDP1 unit: the model itself
    assert executor.sharding_root(model, outer=wrapper) is model


@pytest.mark.core
def test_configure_hands_the_wrapper_to_the_executor():
    ctl = WeightWatcherController(output_dir=MEMORY_ONLY, trackers=None, log_fn=lambda line: None,
                                  async_analysis=False, start_fraction=0)
    outer = object()
    ctl.configure(total_steps=4, is_global_zero=True, wrapper=outer)
    assert ctl.executor.outer is outer
    weights = {"fc.weight": np.random.default_rng(0).standard_normal((64, 32))}
    ctl.finish(weights, step=4, epoch=0)
    assert ctl.history.steps == [4]


@pytest.mark.parametrize("find_unused", [True, False])
def test_lightning_ddp_check_reads_the_public_wrapper(find_unused):
    torch = pytest.importorskip("torch")
    pytest.importorskip("lightning")
    from torch.nn.parallel import DistributedDataParallel

    from ww_callbacks.lightning import _ddp_without_unused

    ddp = DistributedDataParallel.__new__(DistributedDataParallel)   # no process group needed
    torch.nn.Module.__init__(ddp)
    ddp.find_unused_parameters = find_unused
    kwargs = {"find_unused_parameters": not find_unused}
    strategy = type("Strategy", (), {"model": ddp, "_ddp_kwargs": kwargs})()
    assert _ddp_without_unused(strategy) is (not find_unused)      # the wrapper wins
