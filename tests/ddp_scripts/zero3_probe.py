"""Shared by zero3_hf_trainer.py and zero3_lightning.py (DeepSpeed ZeRO-3 under a framework's own
trainer, CPU accelerator, gloo): the ZeRO-3 config, and a probe that records

* each ``deepspeed.zero.GatheredParameters`` entered while the callback's controller runs
  (``maybe_run`` / ``finish``): how many parameters, the weight's shape, its local size before the
  gather, and how many other parameters were available (gathered) at that moment;
* a float64 reference at each analysed step (:meth:`Zero3Probe.reference`, called by a callback
  placed after ours): the status of every parameter first (re-partitioned after our analysis?),
  then all of them gathered at once and analysed unsharded;
* the status of every parameter at the end.

Each rank writes ``zero3_<rank>.json``; see tests/test_fsdp2.py.
"""

import json
import os

import deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

import ww_core

REAL_GATHER = deepspeed.zero.GatheredParameters


def ds_config(**extra):
    """ZeRO-3 with every parameter partitioned (locally of shape ``(0,)`` between uses)."""
    return {"zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, **extra}


def watched(callback_cls, out_dir, rank):
    """``(callback, probe, log lines)``: the framework's ``WeightWatcherCallback`` as both scripts
    configure it (an analysis every 2 steps, float64, no trackers) and the probe on its controller."""
    lines = []
    ww = callback_cls(start_fraction=0.0, every_n_steps=2, trackers=None, precision="float64",
                      output_dir=os.path.join(out_dir, f"ww-rank{rank}"), log_fn=lines.append)
    return ww, Zero3Probe(ww.controller), lines


class Zero3Probe:
    def __init__(self, controller):
        self.gathers, self.refs, self.status_before_ref, self.local_numel = [], {}, {}, {}
        self._module, self._on = None, False
        probe = self

        class Probe(REAL_GATHER):
            def __init__(self, ps, *args, **kwargs):
                if probe._on:
                    ps = ps if isinstance(ps, (list, tuple)) else [ps]
                    mine = {id(p) for p in ps}
                    others = [p for p in probe._module.parameters() if id(p) not in mine
                              and p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
                    probe.gathers.append({"num": len(ps), "shape": list(ps[0].ds_shape),
                                          "local_numel": int(ps[0].numel()),
                                          "available_before": len(others)})
                super().__init__(ps, *args, **kwargs)

        deepspeed.zero.GatheredParameters = Probe
        for name in ("maybe_run", "finish"):
            setattr(controller, name, self._probed(getattr(controller, name)))

    def _probed(self, real):
        def call(model, *args, **kwargs):
            self._module, self._on = model, True
            try:
                return real(model, *args, **kwargs)
            finally:
                self._on = False
        return call

    def reference(self, module, step):
        """Every parameter's status, then all gathered at once and analysed in float64."""
        params = list(module.parameters())
        self.status_before_ref[step] = sorted({p.ds_status.name for p in params})
        self.local_numel[step] = sum(int(p.numel()) for p in params)
        with REAL_GATHER(params, modifier_rank=None):
            full = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.refs[step] = ww_core.analyze(full, precision="float64").to_records()

    def dump(self, out_dir, rank, module, **extra):
        deepspeed.zero.GatheredParameters = REAL_GATHER
        params = list(module.parameters())
        with open(os.path.join(out_dir, f"zero3_{rank}.json"), "w") as fh:
            json.dump({"gathers": self.gathers, "refs": self.refs,
                       "status_before_ref": self.status_before_ref, "local_numel": self.local_numel,
                       "final_status": sorted({p.ds_status.name for p in params}),
                       "final_local_numel": sum(int(p.numel()) for p in params), **extra}, fh)
