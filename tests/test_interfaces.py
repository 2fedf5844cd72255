"""The declared interfaces: every executor implements the ``Executor`` protocol, every device
session ``DeviceSession``, with capabilities as declared members (no attribute probing)."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from ember.runtime.executor_protocol import DeviceSession, Executor, missing_members

EXECUTORS = [("ember.runtime.executor", "LocalExecutor"), ("ember.runtime.cuda_session", "DeviceExecutor"),
             ("ember.runtime.tp.executor", "TPExecutor")]
DEVICE_SESSIONS = [("ember.runtime.cuda_session", "CudaStepSession"), ("ember.runtime.cuda_session", "CudaDecodeSession"),
                   ("ember.runtime.trt_session", "TensorRTStepSession")]


def _class(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module,name", EXECUTORS)
def test_executor_classes_implement_the_protocol(module, name):
    cls = _class(module, name)
    # instance-set members (DeviceExecutor's supports_chaining) are checked on an instance below
    missing = [m for m in missing_members(cls, Executor) if m != "supports_chaining" or name != "DeviceExecutor"]
    assert missing == [], f"{name} lacks {missing}"


def test_executor_instances_declare_chaining():
    from ember.runtime.cuda_session import DeviceExecutor
    from ember.runtime.executor import LocalExecutor

    class Session:  # a DeviceSession that chains
        supports_chaining, cuda_graph_status, lock = True, "off", None

        def forget_graphs(self):
            pass

    class Pool:
        generation = used_tokens = 0

    local = LocalExecutor(session=None, pool=Pool())
    device = DeviceExecutor(Session(), Pool())
    assert isinstance(local, Executor) and local.supports_chaining is False
    assert isinstance(device, Executor) and device.supports_chaining is True


@pytest.mark.parametrize("module,name", DEVICE_SESSIONS)
def test_device_sessions_declare_their_capabilities(module, name):
    cls = _class(module, name)
    # lock is made per instance in __init__; the rest are declared on the class
    assert [m for m in missing_members(cls, DeviceSession) if m != "lock"] == []
    assert "self.lock = " in Path(importlib.import_module(module).__file__).read_text()


def test_tensorrt_session_states_it_does_not_chain():
    from ember.runtime.trt_session import TensorRTStepSession

    assert TensorRTStepSession.supports_chaining is False and TensorRTStepSession.cuda_graph_status == "off"


def test_paged_executors_implement_the_paged_protocol():
    from ember.engine_format.decoder_spec import KVGeometry
    from ember.runtime.executor_protocol import PagedExecutor
    from ember.runtime.paged_executor import HostPagedExecutor

    ex = HostPagedExecutor(session=None, geometry=KVGeometry(1, 1, 2), num_blocks=2, block_size=4, dtype="float32")
    assert missing_members(ex, PagedExecutor) == [] and isinstance(ex, PagedExecutor)
    assert ex.supports_chaining is False and (ex.num_blocks, ex.block_size) == (2, 4)


@pytest.mark.parametrize("path", ["executor.py", "decoder.py", "cuda_session.py", "tp/executor.py", "paged_executor.py",
                                  "cuda_paged.py", "step_runner.py"])
def test_the_engine_never_probes_an_executor(path):
    text = (Path(__file__).parents[1] / "ember" / "runtime" / path).read_text()
    assert not re.findall(r"\b(getattr|hasattr)\(", text), f"ember/runtime/{path} probes attributes"
