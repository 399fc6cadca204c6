"""Pretend CUDA: run real code with real values on this CPU-only torch as if its tensors lived on a GPU.

Inside `pretend_cuda()`, a tensor made for "cuda" (by a factory with device="cuda", `.to("cuda")`,
`.cuda()`, or as the result of an op on such tensors) is an `OnCuda`: a CPU tensor that reports
`device == cuda:0`. Every aten op is checked against the rules a real GPU enforces and fails with
`DeviceMismatch` where CUDA would:

- an op mixing cuda and cpu tensors (0-dim cpu scalars and cross-device copies excepted, as in torch);
- a generator of one device used for tensors of the other;
- a collective (any c10d op) handed a cpu tensor: NCCL, the backend on GPUs, has no CPU tensors.

The values are computed on the CPU (collectives run over gloo on the hosts), so training, sampling and
checkpoints proceed for real. Ops that would make the host wait for the device are counted in
`PretendCudaMode.host_syncs` by name, and the dtypes each kind of collective carried are kept in
`PretendCudaMode.collective_dtypes`. `torch.save` writes what it saves from `OnCuda` tensors as
a CUDA run does, with storages tagged "cuda:0", so a file saved here fails to load on a CPU-only
machine unless `map_location` moves it.

Why not FakeTensorMode: its tensors carry no values (a training step has data-dependent shapes and
host reads), and on this CPU build autograd asks for a CUDA device guard and aborts. `OnCuda` is a
meta tensor to C++ (no device guard is ever needed) and a cuda tensor to Python.

What cannot be pretended is patched for the duration, each named in `pretend_cuda`: the handful of
`torch.cuda` queries, `torch.Generator(device="cuda")`, DeepSpeed's accelerator device names and the
device of torch's object collectives (what the NCCL backend would choose).
"""
import contextlib
import pickle
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten


class DeviceMismatch(RuntimeError):
    """What CUDA (or NCCL) would have refused."""


class OnCuda(torch.Tensor):
    """`host`, a CPU tensor, presented as a tensor on cuda:0."""

    @staticmethod
    def __new__(cls, host: torch.Tensor):
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, host.size(), strides=host.stride(), storage_offset=host.storage_offset(), dtype=host.dtype,
            layout=host.layout, device=torch.device("meta"), requires_grad=host.requires_grad)
        tensor.host = host
        return tensor

    device = property(lambda self: CUDA)
    is_cuda = property(lambda self: True)
    is_meta = property(lambda self: False)
    is_cpu = property(lambda self: False)

    def get_device(self):
        return CUDA.index

    def data_ptr(self):
        return self.host.data_ptr()

    def untyped_storage(self):
        return self.host.untyped_storage()

    def __reduce_ex__(self, protocol):
        raise pickle.PicklingError("an OnCuda tensor is saved through pretend_cuda's torch.save")

    def __repr__(self, *, tensor_contents=None):
        return f"OnCuda({self.host!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an OnCuda tensor outside pretend_cuda()")


# Ops that take tensors of two devices on a real GPU too: copies, and indexing with cpu indices.
CROSS_DEVICE = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
                aten._index_put_impl_.default, aten.lift_fresh.default, aten.set_.source_Tensor}
# Ops that wait for the device: a scalar or shape read back, or an output whose size depends on values.
HOST_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default, aten.bincount.default,
              aten.equal.default, aten.is_nonzero.default}
COLLECTIVES_WITHOUT_DATA = {"barrier", "monitored_barrier_"}

_REAL_GENERATOR = torch.Generator
_cuda_generators = {}  # id -> generator made for cuda (kept alive here, so ids stay unique)


class _GeneratorMeta(type):
    def __instancecheck__(cls, instance):
        return isinstance(instance, _REAL_GENERATOR)


class _Generator(metaclass=_GeneratorMeta):
    """torch.Generator(device="cuda") needs CUDA: a CPU generator remembered as a cuda one."""

    def __new__(cls, device="cpu"):
        generator = _REAL_GENERATOR()
        if torch.device(device).type == "cuda":
            _cuda_generators[id(generator)] = generator
        return generator


def _generator_device(generator) -> str:
    return "cuda" if id(generator) in _cuda_generators else "cpu"


def _boolean_mask_indexing(func, args) -> bool:
    """x[mask] and x[mask] = v: the result's size (or the positions) come from counting the mask."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default):
        return False
    return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1])


def _waits_for_device(func, args, kwargs, on_cuda) -> bool:
    """Whether CUDA would make the host wait: a value or a size read back, or a blocking copy between host and
    device (a copy to the device from pageable memory waits for the device's queue too)."""
    if func in HOST_SYNCS or _boolean_mask_indexing(func, args):
        return bool(on_cuda)
    if func is aten.repeat_interleave.Tensor:  # the output size must be read back unless given
        return bool(on_cuda) and kwargs.get("output_size") is None
    if func is aten._to_copy.default and not kwargs.get("non_blocking", False):
        source_on_cuda = isinstance(args[0], OnCuda)
        return source_on_cuda != _claims_cuda(kwargs.get("device")) if "device" in kwargs else False
    if func is aten.copy_.default and not (args[2:] and args[2]) and not kwargs.get("non_blocking", False):
        return isinstance(args[0], OnCuda) != isinstance(args[1], OnCuda)
    return False


def _sync_site() -> str:
    """file:line of the innermost frame of the package or the tests that asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        ours = any(part in frame.filename for part in ("/diffmoe_scale/", "/tests/", "/benchmarks/"))
        if ours and not frame.filename.endswith("pretend_cuda.py"):
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


def _host(value):
    return value.host if isinstance(value, OnCuda) else value


def _wrap(value):
    return OnCuda(value) if isinstance(value, torch.Tensor) and not isinstance(value, OnCuda) else value


def _claims_cuda(device) -> bool:
    return device is not None and torch.device(device).type in ("cuda", "meta")  # C++ sees OnCuda as meta


def _returns_self(func) -> bool:
    """In-place aten ops (add_, copy_, ...) return their first argument."""
    schema = func._schema
    return (func.namespace == "aten" and schema.returns and schema.returns[0].alias_info is not None
            and schema.returns[0].alias_info.is_write and schema.arguments[0].alias_info is not None)


class PretendCudaMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.host_syncs: dict[str, int] = {}
        self.sync_sites: list[str] = []  # "op at file:line" of each sync, in order
        self.collective_dtypes: dict[str, set] = {}  # c10d op name -> dtypes of the tensors it carried

    def count_sync(self, name: str) -> None:
        self.host_syncs[name] = self.host_syncs.get(name, 0) + 1
        self.sync_sites.append(f"{name} at {_sync_site()}")

    def reset_counts(self) -> None:
        self.host_syncs, self.sync_sites = {}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_cuda = [t for t in tensors if isinstance(t, OnCuda)]
        on_cpu = [t for t in tensors if not isinstance(t, OnCuda)]
        self._check(func, kwargs, on_cuda, on_cpu)
        if _waits_for_device(func, args, kwargs, on_cuda):
            self.count_sync(func.__name__)
        to_cuda = _claims_cuda(kwargs.get("device"))
        if to_cuda:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_host, args), **tree_map(_host, kwargs))
        if func.namespace == "c10d":
            self.collective_dtypes.setdefault(func._opname, set()).update(str(t.dtype) for t in on_cuda)
            return out  # in place on the hosts: the tensors handed in hold the results
        if isinstance(args[0] if args else None, OnCuda) and _returns_self(func):
            return args[0]
        explicit_device = kwargs.get("device") is not None and not to_cuda
        wrap = to_cuda or (bool(on_cuda) and not explicit_device and func is not aten.copy_.default)
        return tree_map(_wrap, out) if wrap else out

    @staticmethod
    def _check(func, kwargs, on_cuda, on_cpu) -> None:
        if func.namespace == "c10d":
            if on_cpu and func._opname not in COLLECTIVES_WITHOUT_DATA:
                raise DeviceMismatch(f"{func}: a collective was handed a cpu tensor of shape "
                                     f"{tuple(on_cpu[0].shape)}; NCCL takes CUDA tensors only")
            return
        if on_cuda and func not in CROSS_DEVICE:
            cpu = [t for t in on_cpu if t.dim() > 0]
            if cpu:
                raise DeviceMismatch(f"{func}: cuda and cpu tensors mixed (a cpu tensor of shape {tuple(cpu[0].shape)})")


def _cuda_target(args, kwargs):
    for value in (kwargs.get("device"), *args):
        if isinstance(value, (str, torch.device, int)) and not isinstance(value, bool):
            device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
            return device if device.type == "cuda" else None
    return None


class CudaMoves(TorchFunctionMode):
    """This CPU build refuses `.to("cuda")`, `.cuda()` and `torch.tensor(..., device="cuda")` before any
    dispatch: route them to aten._to_copy.
    Also checks that a generator's device is that of the tensors it draws, and counts `tolist` (a host
    read that reaches no op)."""

    def __init__(self, mode: "PretendCudaMode"):
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(kwargs.get("device"), int) and not isinstance(kwargs["device"], bool):
            kwargs = {**kwargs, "device": torch.device("cuda", kwargs["device"])}  # an index names the accelerator
        generator = kwargs.get("generator")
        if generator is not None:  # checked here: below, the dispatcher hands ops a new Python object for it
            on_cuda = _cuda_target((), kwargs) is not None or any(isinstance(a, OnCuda) for a in args)
            wanted = "cuda" if on_cuda else "cpu"
            if _generator_device(generator) != wanted:
                raise DeviceMismatch(f"{func.__name__}: a {_generator_device(generator)} generator for a {wanted} tensor")
        if func == torch.Tensor.data.__set__ and isinstance(args[0], OnCuda):
            target, value = args
            if not isinstance(value, OnCuda):
                raise DeviceMismatch("`.data =` of a cuda tensor set to a cpu tensor")
            func(target, value)
            target.host = value.host  # what `.data` holds is the host's business here
            return None
        if func in (torch.tensor, torch.as_tensor) and _cuda_target((), kwargs) is not None:
            return aten._to_copy.default(func(*args, **{**kwargs, "device": "cpu"}), device=CUDA)
        if func is torch.Tensor.tolist and isinstance(args[0], OnCuda):
            self.mode.count_sync("tolist")
            return args[0].host.tolist()
        if func is torch.Tensor.cuda:
            func, args, kwargs = torch.Tensor.to, (args[0], CUDA), {**kwargs}
        if func is torch.Tensor.to and _cuda_target(args[1:], kwargs) is not None:
            tensor = args[0]
            dtype = next((a for a in args[1:] if isinstance(a, torch.dtype)), kwargs.get("dtype")) or tensor.dtype
            if isinstance(tensor, OnCuda) and dtype == tensor.dtype:
                return tensor
            return aten._to_copy.default(tensor, dtype=dtype, device=CUDA, non_blocking=kwargs.get("non_blocking", False))
        if func is torch.Tensor.pin_memory:
            return args[0]  # host memory is host memory here; a non-blocking copy from it then waits for nothing
        return func(*args, **kwargs)


def _as_saved_on_cuda(obj, storages: set):
    """`obj` with every OnCuda tensor replaced by its host tensor, whose storage is noted in `storages`."""
    if isinstance(obj, OnCuda):
        host = obj.host.detach()
        storages.add(host.untyped_storage().data_ptr())
        return host
    if isinstance(obj, dict):
        return type(obj)((key, _as_saved_on_cuda(value, storages)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_as_saved_on_cuda(value, storages) for value in obj)
    return obj


_saving_from_cuda: set = set()


def _tag_saved_cuda_storage(storage):
    """torch.save's location tag: "cuda:0" for what pretend_cuda's torch.save took from OnCuda tensors."""
    if storage.device.type == "cpu" and storage.data_ptr() in _saving_from_cuda:
        return "cuda:0"
    return None


def _never_restore(storage, location):
    return None  # torch's own deserializers restore every location


torch.serialization.register_package(5, _tag_saved_cuda_storage, _never_restore)
_real_save = torch.save


def _save(obj, f, *args, **kwargs):
    with torch.utils._python_dispatch._disable_current_modes():
        moved = _as_saved_on_cuda(obj, _saving_from_cuda)
        try:
            return _real_save(moved, f, *args, **kwargs)
        finally:
            _saving_from_cuda.clear()


@contextlib.contextmanager
def pretend_cuda():
    """Yields the mode, whose `host_syncs` counts what would wait for the GPU."""
    from deepspeed.accelerator import get_accelerator

    accelerator = type(get_accelerator())
    mode = PretendCudaMode()
    initialized = torch.cuda._initialized
    torch.cuda._initialized = True  # factories for "cuda" would otherwise try to start CUDA
    patches = [
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.device_count", lambda: 1),
        mock.patch("torch.cuda.set_device", lambda device: None),
        mock.patch("torch.cuda.get_device_capability", lambda device=None: (9, 0)),
        mock.patch("torch.cuda.max_memory_allocated", lambda device=None: 0),
        mock.patch("torch.cuda.get_device_name", lambda device=None: "NVIDIA H200 (pretend)"),
        mock.patch("torch.cuda.synchronize", lambda device=None: None),
        mock.patch("torch.cuda.get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8)),
        mock.patch("torch.cuda.set_rng_state", lambda state, device="cuda": None),
        mock.patch("torch.Generator", _Generator),
        mock.patch("torch.save", _save),
        mock.patch.object(c10d, "_get_object_coll_device", lambda group=None: "cuda"),
        mock.patch.object(accelerator, "device_name", lambda self, device_index=None: "cuda"),
        mock.patch.object(accelerator, "current_device_name", lambda self: "cuda:0"),
        mock.patch.object(accelerator, "current_device", lambda self: 0),
        mock.patch.object(accelerator, "on_accelerator", lambda self, tensor: tensor.device.type == "cuda"),
    ]
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            stack.enter_context(mode)
            stack.enter_context(CudaMoves(mode))
            yield mode
    finally:
        torch.cuda._initialized = initialized
