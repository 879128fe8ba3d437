"""The ONNX Runtime settings CUDA sessions get (omniedge/runtime/ort_cuda.py): ours by default, the user's
environment variables and OMNIEDGE_ORT_CONFIG entries over ours, a malformed entry refused with the form."""

from __future__ import annotations

from typing import Any

import pytest

from omniedge.errors import OmniedgeError
from omniedge.runtime import ort_cuda


class FakeOptions:
    """Records config entries the way onnxruntime.SessionOptions takes them."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value


def test_defaults_are_applied_as_config_entries_or_environment() -> None:
    opts, env = FakeOptions(), {}
    used = ort_cuda.apply(opts, env)
    for s in ort_cuda.SETTINGS:
        if s.config_key:
            assert opts.entries[s.config_key] == s.value == used[s.config_key]
        else:
            assert env[s.env] == s.value == used[s.env]


def test_the_users_environment_variable_wins_and_no_config_entry_overrides_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    both = ort_cuda.Setting("ep.cuda.knob", "ORT_KNOB", "1", "config key and variable")
    env_only = ort_cuda.Setting(None, "ORT_OTHER", "1", "variable only")
    monkeypatch.setattr(ort_cuda, "SETTINGS", (both, env_only))
    opts, env = FakeOptions(), {"ORT_KNOB": "0"}
    used = ort_cuda.apply(opts, env)
    assert used["ORT_KNOB"] == "0" and env["ORT_KNOB"] == "0" and "ep.cuda.knob" not in opts.entries
    assert env["ORT_OTHER"] == "1" == used["ORT_OTHER"]  # ours, where the user set nothing
    opts, env = FakeOptions(), {"ORT_OTHER": "0"}
    ort_cuda.apply(opts, env)
    assert opts.entries["ep.cuda.knob"] == "1" and env["ORT_OTHER"] == "0"


def test_omniedge_ort_config_adds_entries_and_replaces_ours() -> None:
    key = next(s.config_key for s in ort_cuda.SETTINGS if s.config_key)
    env: dict[str, Any] = {ort_cuda.CONFIG_ENV: f" {key}=0 ; ep.cuda.some_key=7;"}
    opts = FakeOptions()
    ort_cuda.apply(opts, env)
    assert opts.entries[key] == "0" and opts.entries["ep.cuda.some_key"] == "7"


def test_a_malformed_config_entry_is_refused_with_the_form() -> None:
    with pytest.raises(OmniedgeError, match="not key=value") as e:
        ort_cuda.apply(FakeOptions(), {ort_cuda.CONFIG_ENV: "session.x"})
    assert "OMNIEDGE_ORT_CONFIG=" in e.value.fix


def test_cpu_sessions_get_none_of_them(tmp_path: Any) -> None:
    from omniedge.runtime.backends import OrtBackend

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    b = OrtBackend("id", path)
    b.load()
    assert b.cuda_settings == {}


def test_omniedge_cuda_options_reach_the_cuda_provider_over_ours(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniedge.runtime.backends import OrtBackend

    monkeypatch.setenv(ort_cuda.OPTIONS_ENV, "sdpa_kernel=1; arena_extend_strategy=kNextPowerOfTwo")
    b = OrtBackend("id", tmp_path / "none.onnx", cuda_graph=True)
    b.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # as resolved on a GPU machine
    b.cuda_graph = True
    opts = b._provider_options("CUDAExecutionProvider")
    assert opts == {"arena_extend_strategy": "kNextPowerOfTwo", "enable_cuda_graph": "1", "sdpa_kernel": "1"}
    assert b._provider_options("CPUExecutionProvider") == {}
    monkeypatch.setenv(ort_cuda.OPTIONS_ENV, "sdpa_kernel")
    with pytest.raises(OmniedgeError, match="OMNIEDGE_CUDA_OPTIONS has 'sdpa_kernel', not key=value") as e:
        b._provider_options("CUDAExecutionProvider")
    assert 'OMNIEDGE_CUDA_OPTIONS="sdpa_kernel=1' in e.value.fix
