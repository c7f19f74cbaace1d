"""Count the tensor operations that make the host wait for the device, without a GPU.

On CUDA, reading a tensor's value on the host (`item`, `tolist`, `bool(tensor)`, a copy to the CPU, ...) blocks until
every queued kernel has finished: the GPU then idles while Python prepares the next step. On a CPU machine nothing
blocks, so such operations go unnoticed. `HostSyncCounter` records them through a `TorchFunctionMode`, which sees every
torch function and tensor method called while it is active, whatever device the tensors are on; `torch.cuda`'s own
`set_sync_debug_mode` is the on-device equivalent.

Example:
    ```py
    with HostSyncCounter() as syncs:
        step(h)
    assert syncs.count == 0, syncs.events
    ```
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode


# Tensor methods and torch functions whose result on the host needs the tensor's value (or, for `nonzero` and
# boolean-mask indexing, its data-dependent size).
SYNC_METHODS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
    torch.Tensor.__array__: "__array__",
    torch.Tensor.__format__: "__format__",
    torch.Tensor.__repr__: "__repr__",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.Tensor.unique: "unique",
    torch.unique: "unique",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.equal: "equal",
    torch.Tensor.equal: "equal",
    torch.Tensor.allclose: "allclose",
    torch.allclose: "allclose",
}
_COPIES = {torch.Tensor.to, torch.Tensor.copy_}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _is_host(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _copies_to_host(func, args, kwargs) -> bool:
    """`tensor.to("cpu")` / `tensor.to(cpu_tensor)` / `cpu_tensor.copy_(tensor)`: a copy that lands on the host, from
    whatever device (on a CPU-only machine the source is on the host too: on CUDA it would be a device copy)."""
    if func is torch.Tensor.copy_:
        return isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
    device = kwargs.get("device")
    for value in args[1:]:
        if isinstance(value, (str, torch.device)):
            try:
                device = torch.device(value)
            except RuntimeError:
                continue
        elif isinstance(value, torch.Tensor):
            device = value.device
    return _is_host(device) and isinstance(args[0], torch.Tensor)


def _boolean_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class HostSyncCounter(TorchFunctionMode):
    """While active, counts (in `events`, the operation names in call order) every tensor operation that would make
    the host wait for a CUDA device: value reads (`item`, `tolist`, `numpy`, `bool`/`int`/`float` of a tensor, which
    is also what Python control flow on a tensor does), copies to the host (`cpu`, `to("cpu")`), and operations whose
    output size depends on values (`nonzero`, `unique`, `masked_select`, boolean-mask indexing).

    Tensors the counter saw being made on the host (a copy to the host, a tensor built from Python or numpy data
    without a device, and what is computed from host tensors only) are known to live there: reading them again costs
    nothing, so one copy to the host followed by `numpy()` counts once. Every other tensor is taken to be on the
    device, as it would be on a GPU machine."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._host: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive, so that an id is never reused)

    @property
    def count(self) -> int:
        return len(self.events)

    def _on_host(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and self._host.get(id(tensor)) is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors(list(args)) + _tensors(list(kwargs.values()))
        source = args[0] if args else None
        event = SYNC_METHODS.get(func)
        if event is None and func in _COPIES and _copies_to_host(func, args, kwargs):
            event = "copy to host"
        elif event is None and func in _INDEXING and _boolean_index(args):
            event = "boolean index"
        if event is not None and not (
            self._on_host(source) and (func is not torch.Tensor.copy_ or self._on_host(args[1]))
        ):
            self.events.append(event)
        result = func(*args, **kwargs)
        if event in ("cpu", "copy to host") and result is source:
            # On this CPU-only machine the "copy" is the tensor itself; on CUDA it is a new host tensor, and the
            # source stays on the device: return an alias to mark as host, leaving the source as it was.
            result = result.view_as(result)
        made_on_host = not inputs and _is_host(kwargs.get("device", "cpu"))
        if event in ("cpu", "copy to host") or made_on_host or (inputs and all(self._on_host(t) for t in inputs)):
            for tensor in _tensors(result):
                self._host[id(tensor)] = tensor
        return result
