"""DeepSpeed ZeRO-3 pieces that need no process group: which gather the LM head uses, and the engine unwrapped.

The 2-rank runs are in tests/distributed/test_zero.py; these pin the two facts those runs rest on, cheaply: a
parameter with `ds_id` is gathered through `deepspeed.runtime.zero.GatheredParameters` (once `deepspeed.zero`, an
import that always failed and was swallowed, so the fused loss read empty shards), and a DeepSpeedEngine is stripped
like DDP.
"""

import contextlib
import sys

import pytest
import torch
from torch import nn

from kl_nontarget.models.introspection import transformers_model, unwrap_model
from kl_nontarget.models.lm_head import _zero3_gathered


def test_zero3_gather_goes_through_deepspeed_runtime_zero(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    zero = pytest.importorskip("deepspeed.runtime.zero")
    entered = []

    @contextlib.contextmanager
    def recording(params, modifier_rank=None, **kwargs):
        entered.append((list(params), modifier_rank))
        yield

    monkeypatch.setattr(zero, "GatheredParameters", recording)
    partitioned, plain = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.ones(2))
    partitioned.ds_id = 0
    with _zero3_gathered([partitioned, None, plain]):
        pass
    # One gather, of the partitioned parameter only, read-only (no modifier rank).
    assert len(entered) == 1 and entered[0][0] == [partitioned] and entered[0][1] is None
    with _zero3_gathered([plain, None]):  # nothing partitioned: no gather
        pass
    assert len(entered) == 1


def test_zero3_gather_without_deepspeed_is_an_error(monkeypatch):
    # A partitioned head and no importable GatheredParameters: a named error, never a loss on empty shards.
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero", None)
    param = nn.Parameter(torch.zeros(0))
    param.ds_id = 3
    with pytest.raises(RuntimeError, match="partitioned by DeepSpeed ZeRO-3"):
        with _zero3_gathered([param]):
            pass


def test_deepspeed_engine_is_unwrapped():
    inner = nn.Linear(2, 2)
    # Recognised by class name and module, without importing deepspeed (a subclass counts too).
    engine_type = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    sub_type = type("MyEngine", (engine_type,), {"__module__": "my_project"})
    for cls in (engine_type, sub_type):
        engine = cls()
        engine.module = inner
        assert unwrap_model(engine) is inner and transformers_model(engine) is inner
    impostor = type("DeepSpeedEngine", (nn.Module,), {"__module__": "elsewhere"})()
    impostor.module = inner
    assert unwrap_model(impostor) is impostor
