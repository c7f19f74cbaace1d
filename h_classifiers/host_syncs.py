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
    """`tensor.to("cpu")` / `tensor.to(cpu_tensor)` / `cpu_tensor.copy_(tensor)`: a copy that lands on the host.
    On a CPU-only machine every tensor is on the host, so any such copy is counted: on CUDA it would be one."""
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
    return _is_host(device) and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"


def _boolean_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class HostSyncCounter(TorchFunctionMode):
    """While active, counts (in `events`, the operation names in call order) every tensor operation that would make
    the host wait for a CUDA device: value reads (`item`, `tolist`, `numpy`, `bool`/`int`/`float` of a tensor, which
    is also what Python control flow on a tensor does), copies to the host (`cpu`, `to("cpu")`), and operations whose
    output size depends on values (`nonzero`, `unique`, `masked_select`, boolean-mask indexing)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    @property
    def count(self) -> int:
        return len(self.events)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = SYNC_METHODS.get(func)
        if name is not None:
            self.events.append(name)
        elif func in _COPIES and _copies_to_host(func, args, kwargs):
            self.events.append("copy to host")
        elif func in _INDEXING and _boolean_index(args):
            self.events.append("boolean index")
        return func(*args, **kwargs)
