"""Activations in (pinned) host memory between a layer's forward and its backward.

`torch.autograd.graph.saved_tensors_hooks` hands us every tensor autograd saves for backward
while a layer runs. The offloader copies each one to host memory on a side stream, so the copy
overlaps the next layers' compute, and gives autograd a handle instead; the GPU tensor is freed
once its copy is done. In backward, the first time a layer's tensors are asked for, the offloader
copies them back and at once starts copying the previous layer's back too, so that layer's
tensors are on the card before its backward begins. Events order every copy against the compute
stream. Around a recomputed (checkpointed) layer, the only tensor saved is the layer's input, so
offloading that is Unsloth's "offloaded gradient checkpointing"; around a plain layer it is
torchtune's `OffloadActivations`, every saved activation moved.

The stream calls go through `torch.get_device_module(device)`: on a GPU they are CUDA streams
and events; on the CPU they exist and do nothing, so tests run this very code, the copies being
plain host-to-host copies (pinned memory needs an accelerator).
"""

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Smaller tensors stay where they are: moving them costs a copy launch each and saves nothing.
MIN_OFFLOAD_BYTES = 2**20


@dataclass
class _Layer:
    """The tensors one layer's forward offloaded, in host memory until its backward fetches them."""

    previous: "_Layer | None"
    host: list[torch.Tensor] = field(default_factory=list)  # whole storages, flat
    by_key: dict[tuple, int] = field(default_factory=dict)  # one copy of a storage saved twice
    on_device: list[torch.Tensor] | None = None  # fetched; freed with the last handle autograd drops
    fetched: Any = None  # the event after which `on_device` is filled
    ready: bool = False  # the compute stream already waits for `fetched`


@dataclass(frozen=True)
class _Handle:
    """What autograd keeps instead of an offloaded tensor: where its storage went, and its view of it."""

    layer: _Layer
    index: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class ActivationOffloader:
    """Moves what autograd saves inside `offloaded(layer)` blocks to host memory and back.

    One instance serves one model: `offloaded(...)` wraps each offloaded layer's forward, in
    order, and `forward_done()` follows the last layer. `host_bytes` and `peak_host_bytes` say how
    much host memory the offloaded tensors hold (the pinned allocator may round each up to a power
    of two)."""

    def __init__(self, device: torch.device, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.device, self.min_bytes = device, min_bytes
        self.streams = torch.get_device_module(device)  # torch.cuda, or torch.cpu's no-op streams
        self.side = self.streams.Stream()
        self.pin = device.type != "cpu"  # pinned host memory exists only with an accelerator
        self.host_bytes = self.peak_host_bytes = 0
        self._last: _Layer | None = None  # the latest offloaded layer of the forward under way
        self._copying: list[tuple[_Layer, torch.Tensor, Any]] = []  # sources of copies under way, with events
        self._owned: dict[nn.Module, list[torch.Tensor]] = {}  # each module's plain tensors, found once

    @contextlib.contextmanager
    def offloaded(self, module: nn.Module, keep: Iterable[torch.Tensor] = ()) -> Iterator[None]:
        """Runs the block with its saved tensors offloaded, except `module`'s own parameters and
        buffers and the `keep` tensors (shared by every layer, such as the rotary tables)."""
        self._release_copied(but=self._last)
        layer = _Layer(previous=self._last)
        self._last = layer
        kept = {t.untyped_storage().data_ptr() for t in keep}
        stays: set[int] | None = None

        def pack(tensor: torch.Tensor) -> Any:
            nonlocal stays
            if not self._worth_moving(tensor):
                return tensor
            if stays is None:  # at the first save worth moving, once a sharded layer has gathered its weights
                stays = {t.untyped_storage().data_ptr() for t in self._owned_tensors(module)} | kept
            if tensor.untyped_storage().data_ptr() in stays:
                return tensor
            return self._offload(layer, tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def forward_done(self) -> None:
        """After the last layer: the next `offloaded` block starts a new forward, and the copies
        still running are waited for, so their sources can be freed before the loss runs."""
        self._last = None
        self._release_copied()

    def _owned_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """`module`'s plain tensors (see _plain_tensors), listed at its first offloaded forward: walking
        its parameters at every forward took ~60 us of host time a layer (a compiled tiny layer on
        the CPU; on the GPU it hid behind the kernels, call 34). Their storages are read at every
        forward, since FSDP2 frees and reallocates a gathered weight's storage each step while
        keeping the tensor."""
        if module not in self._owned:
            self._owned[module] = _plain_tensors(module)
        return self._owned[module]

    def _worth_moving(self, tensor: torch.Tensor) -> bool:
        # Plain tensors only: NF4 weights and other subclasses are parameters, not activations.
        return (type(tensor) is torch.Tensor and tensor.device == self.device
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def _offload(self, layer: _Layer, tensor: torch.Tensor) -> _Handle:
        """Copies the tensor's whole storage, once per layer however many of its views are saved
        (the MLP's chunks are views of one tensor), so that the tensor comes back with its exact
        strides and offset: compiled backward graphs check them."""
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.dtype)
        if key not in layer.by_key:
            flat = torch.as_strided(tensor.detach(), (storage.nbytes() // tensor.element_size(),), (1,), 0)
            compute = self.streams.current_stream()
            self.side.wait_stream(compute)  # the tensor's value is computed before it is copied
            with self.streams.stream(self.side):
                host = torch.empty(flat.shape, dtype=flat.dtype, device="cpu", pin_memory=self.pin)
                host.copy_(flat, non_blocking=True)
            self._copying.append((layer, tensor, self.side.record_event()))
            layer.by_key[key] = len(layer.host)
            layer.host.append(host)
            self.host_bytes += storage.nbytes()
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return _Handle(layer, layer.by_key[key], tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

    def _release_copied(self, but: _Layer | None = None) -> None:
        """Lets the sources of copies go, all but `but`'s: the compute stream waits for each copy's
        event, so the caching allocator may hand the memory to later compute only after the copy
        read it. A layer's copies start once its forward is done, so the next layer's forward runs
        beside them and the one after waits for them (waiting at the next layer left the GPU idle
        while each layer's input crossed the bus)."""
        compute = self.streams.current_stream()
        for layer, _, event in self._copying:
            if layer is not but:
                compute.wait_event(event)
        self._copying = [copy for copy in self._copying if copy[0] is but]

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Handle):
            return saved
        layer = saved.layer
        if layer.on_device is None:
            self._fetch(layer)
        if layer.previous is not None and layer.previous.on_device is None:
            self._fetch(layer.previous)  # the layer backward reaches next: its copy overlaps this one
        if not layer.ready:
            self.streams.current_stream().wait_event(layer.fetched)
            layer.ready = True
        return layer.on_device[saved.index].as_strided(saved.shape, saved.stride, saved.offset)

    def _fetch(self, layer: _Layer) -> None:
        """Starts copying `layer`'s tensors back. The GPU memory is taken on the compute stream,
        whose earlier work the side stream waits for, so no copy writes memory still in use; the
        host copies are freed as they are read (the pinned allocator waits for the copy)."""
        compute = self.streams.current_stream()
        on_device = [torch.empty_like(host, device=self.device) for host in layer.host]
        self.side.wait_stream(compute)
        with self.streams.stream(self.side):
            for target, host in zip(on_device, layer.host):
                target.copy_(host, non_blocking=True)
        layer.fetched = self.side.record_event()
        self.host_bytes -= sum(host.nbytes for host in layer.host)
        layer.host, layer.on_device = [], on_device


def _plain_tensors(module: nn.Module) -> list[torch.Tensor]:
    """`module`'s parameters and buffers, and the plain tensors inside subclass ones (an NF4 weight's
    codes and scales, which its linear saves for backward): their storages are never offloaded."""
    found, tensors = [], [*module.parameters(), *module.buffers()]
    while tensors:
        tensor = tensors.pop()
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            inner = [getattr(tensor, name) for name in names]
            tensors += [t for t in inner if isinstance(t, torch.Tensor)]  # a DTensor also names its device mesh
        else:
            found.append(tensor)
    return found
