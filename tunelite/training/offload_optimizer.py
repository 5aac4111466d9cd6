"""AdamW with its state and its step in host memory, overlapped with the GPU's work.

Full fine-tuning of an 8B model on a 24 GB card: the GPU keeps the bf16 weights and the
activations; fp32 master weights, both AdamW moments and the gradient accumulator live in host
memory, and the CPU runs the update while the GPU computes. For each parameter p:

  backward  p's gradient is complete: its post-accumulate-grad hook copies it (on a side CUDA
            stream) into a pinned staging ring and frees the GPU gradient at once;
  worker    once the copy has landed, adds it into p's host accumulator (the first micro-batch
            of a step copies), one pass over each; at the last micro-batch (as many as the step
            before had) it takes the accumulated gradient's squared norm in the same pass;
  step      after the last micro-batch: `total_grad_norm()` waits for the last gradients and
            adds up their norms (taking any the worker could not foresee), clipping becomes a
            scale applied inside the update, and the updates are queued in forward order
            (embedding first);
  worker    fused CPU AdamW on p's fp32 master and moments, chunk by chunk; the new fp32 master
            weights (pinned) are copied to the GPU chunk by chunk on a second side stream and
            rounded to the model's dtype there, with an event recorded: the bus carries twice
            the bytes, which it has to spare, and the host makes no pass to convert them;
  forward   each block of the model waits for its own parameters' events before it runs
            (`wait_in_forward`), so the first layers compute while the CPU updates the last.

With `accumulate_on_device`, backward's copies differ: the first micro-batch's gradient is copied
into the accumulator as it is; each later one is added on the device, the accumulator streamed
in and back out chunk by chunk on two side streams (both directions of the bus at once), so host
memory sees each accumulator read and written once a micro-batch by DMA, instead of the staging
write and the worker's three passes (read staging, read and write the accumulator). The worker
then only waits for the last copy; the last micro-batch's norm is taken on the device.

The update waits for every gradient rather than starting with each parameter's last one: the
clip scale needs the total norm, and a NaN in the embedding's gradient (the last to arrive) must
leave every weight unchanged. Exact AdamW semantics, and a skipped step that is a real skip,
come first; what overlaps is the accumulation with backward and the update with the next forward.

One worker thread runs every job in the order it was queued, so results do not depend on timing;
each job's tensor operations run on torch's intra-op threads. On the CPU (tests, CI) the same
code runs with host-to-host copies.
"""

import contextlib
import math
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from tunelite.errors import ConfigError, ResourceError
from tunelite.runtime import host

ACCUMULATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2**30
# Each parameter's region of the flat pinned buffer starts on a cache line.
ALIGN = 64
# Values per fused operation of the update, and per chunk of an accumulator on the device.
CHUNK_SIZE = 2**22
# The staging ring's default size. 8B at 2 x 2048 x 8 on an H200 (call 27): 3,665 tokens/s with a
# ring of twice the largest gradient (1.96 GiB), 4,172 with 4 GiB, 4,331 with 8.
STAGING_GIB = 4.0

EventCallback = Callable[[str, int], None]


def overlapped_cpu_adamw(
    params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    weight_decay: float = 1e-2, accumulation_dtype: str = "fp32", chunk_size: int = CHUNK_SIZE,
    accumulate_on_device: bool = False, staging_gib: float | None = None,
) -> "OverlappedCPUAdamW":
    """The optimizer a config names (`accumulation_dtype` as a string, so YAML can say it).

    `accumulation_dtype: bf16` halves the accumulator (2 bytes a parameter less host memory and
    less host memory traffic per micro-batch): exact with gradient_accumulation_steps 1, rounded
    like bf16 training's own accumulation otherwise. `chunk_size`: values per fused operation.
    `accumulate_on_device`: micro-batches after the first are added on the device (see the
    module's docstring), for hosts whose memory bandwidth a micro-batch waits on. On the one H200
    host measured it was no faster (8B, 2 x 2048 x 8: 4,034 tokens/s against 4,125; the update
    slowed beside its copies), so it is off by default. `staging_gib`: the pinned ring gradients
    land in before the host adds them (default 4, or every gradient where they take less; never
    less than twice the largest). Backward waits while it is full (1.3 s of a 7.5 s step at
    2 x 2048 x 8 with 1.96 GiB); a larger ring absorbs a micro-batch's burst, and lets up to its
    size of gradients wait on the GPU for the bus."""
    if accumulation_dtype not in ACCUMULATION_DTYPES:
        raise ConfigError(f"optimizer.accumulation_dtype: {accumulation_dtype!r} is not one of "
                          f"{sorted(ACCUMULATION_DTYPES)}")
    if staging_gib is not None and staging_gib <= 0:
        raise ConfigError(f"optimizer.staging_gib: {staging_gib} is not a size; give GiB above 0, or leave it out")
    return OverlappedCPUAdamW(params, lr, betas, eps, weight_decay, ACCUMULATION_DTYPES[accumulation_dtype], chunk_size,
                              accumulate_on_device=accumulate_on_device, staging_gib=staging_gib)


def host_memory(numels: list[int], weight_dtype: torch.dtype, accumulation_dtype: torch.dtype = torch.float32,
                chunk_size: int = CHUNK_SIZE, accumulate_on_device: bool = False,
                staging_gib: float | None = None) -> dict[str, int]:
    """Host bytes the optimizer takes for parameters of these sizes, by what holds them: what
    `tunelite estimate` reports and what the optimizer checks against the machine's free memory.
    Per parameter: 8 bytes pageable (the two moments) and, pinned, the fp32 master weights (the
    device reads them back after each update) and the accumulator (4 bytes in fp32, 2 in bf16);
    the staging ring unless the device accumulates."""
    needed = {
        "fp32 master weights (pinned)": sum(_aligned(4 * n) for n in numels),
        "AdamW moments (fp32)": 8 * sum(numels),
        "gradient accumulator (pinned)": sum(_aligned(n * accumulation_dtype.itemsize) for n in numels),
        "gradient staging ring (pinned)": _staging_numel(numels, weight_dtype, staging_gib) * weight_dtype.itemsize,
        "scratch": 4 * chunk_size,
    }
    if accumulate_on_device:
        del needed["gradient staging ring (pinned)"]
    return needed


def device_memory(accumulation_dtype: torch.dtype = torch.float32, chunk_size: int = CHUNK_SIZE,
                  accumulate_on_device: bool = False) -> int:
    """Device bytes the optimizer holds: a chunk of fp32 master weights on its way into the
    model's weights and, with `accumulate_on_device`, two chunks of the accumulator in flight and
    the fp32 copy of one for the last micro-batch's norm."""
    return 4 * chunk_size + ((2 * accumulation_dtype.itemsize + 4) * chunk_size if accumulate_on_device else 0)


def check_host_memory(needed: dict[str, int], meminfo: Path | None = None) -> None:
    """Refuses to start a run whose optimizer would not fit the machine's free memory."""
    parts = ", ".join(f"{name} {size / GIB:.1f} GiB" for name, size in needed.items())
    host.require_host_memory(
        sum(needed.values()), f"the overlapped CPU AdamW ({parts})",
        "Free memory, use a machine with more, set optimizer.accumulation_dtype: bf16 (2 bytes a parameter "
        "less), or use another optimizer (optimizer_in_bwd: True, or torchao's AdamW8bit)", meminfo)


def forward_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The modules a model runs one after another: its children, a ModuleList's elements one by one."""
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield child


@dataclass(eq=False)
class _Slot:
    """One parameter's host state. `landed` and `sumsq` belong to the worker thread; the main
    thread reads them only after `_drain`."""

    index: int
    param: nn.Parameter
    group: dict[str, Any]
    master: torch.Tensor  # fp32, flat
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # fp32 scalar, as torch.optim keeps it (the fused kernel reads it)
    accum: torch.Tensor  # flat, pinned, accumulation dtype
    landed: int = 0  # gradients added into `accum` since the last update or zero_grad
    sumsq: float | None = None  # squared norm of `accum` as it is; None: not taken since its last change
    ready: threading.Event = field(default_factory=threading.Event)  # set once the newest weights are sent
    sent: Any = None  # CUDA event recorded after the copy to the GPU; the forward's stream waits on it
    read: Any = None  # the same event, kept for the worker: `master` is not written before the copy has read it
    arrived: int = 0  # accumulate_on_device: gradients sent this step (the autograd and main threads' count)
    accumulated: Any = None  # accumulate_on_device: CUDA event after the last copy back into `accum`


class _StagingRing:
    """Pinned memory where gradients land from the GPU, handed out first in, first out. A gradient
    stays only until the worker has added it into its accumulator, so the ring holds a few
    layers' gradients, not the model's. A full ring makes backward wait: the GPU never runs far
    ahead of the CPU, and the GPU gradients not yet copied stay bounded by the ring's size."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.regions: deque[tuple[int, int]] = deque()
        self.head = 0
        self.changed = threading.Condition()

    def reserve(self, numel: int, check: Callable[[], None]) -> torch.Tensor:
        """A region of `numel` values; waits while the ring is full, calling `check` (which
        raises when the worker that frees regions has failed) every second."""
        with self.changed:
            while (start := self._free_start(numel)) is None:
                check()
                self.changed.wait(timeout=1.0)
            self.regions.append((start, start + numel))
            self.head = start + numel
        return self.buffer[start:start + numel]

    def release(self) -> None:
        """Frees the oldest region."""
        with self.changed:
            self.regions.popleft()
            if not self.regions:
                self.head = 0
            self.changed.notify_all()

    def _free_start(self, numel: int) -> int | None:
        if not self.regions:
            return 0
        tail = self.regions[0][0]
        if self.head > tail:  # in use: [tail, head); free: [head, end) and [0, tail)
            if self.buffer.numel() - self.head >= numel:
                return self.head
            return 0 if tail >= numel else None
        return self.head if tail - self.head >= numel else None  # wrapped: free is [head, tail)


class OverlappedCPUAdamW:
    """AdamW (torch.optim.AdamW's arithmetic, through its fused CPU kernel) with fp32 master
    weights and moments in host memory, overlapped with backward and the next forward.

    The loop drives it as it drives any optimizer, with the gradient's norm and clipping asked
    of the optimizer, since the gradients are never all on the device:

        for batch in micro_batches: loss(batch).backward()   # gradients leave for the host
        norm = optimizer.total_grad_norm()                   # waits for the last of them
        if finite(loss, norm):
            optimizer.clip_grads_with_norm_(max_norm, norm)  # a scale, applied inside the update
            optimizer.step()
        optimizer.zero_grad()

    Without `wait_in_forward(model)`, `step()` returns once every weight is updated. With it,
    `step()` returns at once and each block of the model waits in its forward for its own
    weights; `state_dict()`, `wait()` and the model's state_dict() wait for all of them.
    `on_event(kind, index)` is called, from the worker thread, with "grad_copied" (a gradient
    landed and was added), "stepped" and "weight_copied" (sent back to the device) for the
    parameter at `index` in the order they were given: what tests assert the order of, and a
    benchmark can time."""

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, accumulation_dtype: torch.dtype = torch.float32, chunk_size: int = CHUNK_SIZE,
        on_event: EventCallback | None = None, accumulate_on_device: bool = False, staging_gib: float | None = None,
    ) -> None:
        self.param_groups = _param_groups(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                                   "weight_decay": weight_decay})
        pairs = [(p, group) for group in self.param_groups for p in group["params"]]
        devices = {p.device for p, _ in pairs}
        if len(devices) != 1:
            raise ValueError(f"the parameters are on several devices ({sorted(map(str, devices))}); put them on one")
        (self.device,) = devices
        weight_dtypes = {p.dtype for p, _ in pairs}
        if len(weight_dtypes) != 1:
            raise ValueError(f"the parameters have several dtypes ({weight_dtypes}); use one")
        (weight_dtype,) = weight_dtypes
        if accumulation_dtype.itemsize < weight_dtype.itemsize:
            raise ValueError(f"accumulating {weight_dtype} gradients in {accumulation_dtype} would round them; "
                             "accumulate in fp32")
        numels = [p.numel() for p, _ in pairs]
        needed = host_memory(numels, weight_dtype, accumulation_dtype, chunk_size, accumulate_on_device, staging_gib)
        check_host_memory(needed)

        self.on_event = on_event
        cuda = self.device.type == "cuda"
        slot_bytes = accumulation_dtype.itemsize
        self._pinned = _host_buffer(needed["gradient accumulator (pinned)"], torch.uint8, cuda)
        masters = _host_buffer(needed["fp32 master weights (pinned)"] // 4, torch.float32, cuda)
        self._staging = torch.empty(chunk_size, dtype=torch.float32, device=self.device) if cuda else None
        self._ring = None if accumulate_on_device else _StagingRing(
            _host_buffer(needed["gradient staging ring (pinned)"] // weight_dtype.itemsize, weight_dtype, cuda))
        # accumulate_on_device: two chunks of accumulator on the device, one streamed in while the
        # other goes back out, each free again once its copy out has run (`_chunk_free`).
        self._device_chunks = ([torch.empty(chunk_size, dtype=accumulation_dtype, device=self.device)
                                for _ in range(2)] if accumulate_on_device else None)
        self._chunk_free: list[Any] = [None, None]
        self._scratch = torch.empty(chunk_size, dtype=torch.float32)
        self._slots: list[_Slot] = []
        self._hooks: list[Any] = []
        offset = master_offset = 0
        for index, (p, group) in enumerate(pairs):
            region = self._pinned[offset:offset + p.numel() * slot_bytes]
            offset += _aligned(p.numel() * slot_bytes)
            master = masters[master_offset:master_offset + p.numel()]
            master_offset += _aligned(4 * p.numel()) // 4
            master.copy_(p.detach().reshape(-1))  # converted on the host, never as an fp32 copy on the GPU
            slot = _Slot(index, p, group, master, torch.zeros_like(master), torch.zeros_like(master),
                         torch.zeros((), dtype=torch.float32), region.view(accumulation_dtype))
            slot.ready.set()
            self._hooks.append(p.register_post_accumulate_grad_hook(partial(self._grad_ready, slot)))
            self._slots.append(slot)
        self._by_param = {slot.param: slot for slot in self._slots}
        self._grad_scale = 1.0
        self._overlapped = False
        self._micro_batches = 0  # the last step's, at whose landing the worker takes each norm (0: unknown)
        if cuda:
            self._to_host, self._to_device = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
            self._fetch = torch.cuda.Stream(self.device)  # accumulate_on_device: chunks in, and the adds
        self._worker = _Worker([self._pinned, masters] + ([self._ring.buffer] if self._ring else []) if cuda else [])
        self._stop_worker = weakref.finalize(self, self._worker.stop)

    # The main thread's side: what the loop calls.

    def total_grad_norm(self) -> torch.Tensor:
        """The 2-norm of the step's gradients (summed over its micro-batches), once all have landed;
        NaN or inf when any gradient is not finite."""
        self._drain()
        landed = [slot for slot in self._slots if slot.landed]
        # The worker took each norm with the last gradient where this step has as many micro-batches
        # as the one before; the others are taken now (the worker is idle after _drain and backward
        # is over, so its scratch is free).
        sumsq = sum(slot.sumsq if slot.sumsq is not None else squared_norm(slot.accum, self._scratch)
                    for slot in landed)
        self._micro_batches = max((slot.landed for slot in landed), default=0)
        return torch.tensor(math.sqrt(sumsq), dtype=torch.float32)

    def clip_grads_with_norm_(self, max_norm: float, total_norm: torch.Tensor) -> None:
        """torch.nn.utils.clip_grads_with_norm_'s scale, min(1, max_norm / (norm + 1e-6)), applied to
        the gradients inside the next update instead of by a pass over them."""
        self._grad_scale = min(1.0, max_norm / (float(total_norm) + 1e-6))

    def step(self) -> None:
        """Queues the update of every parameter that received a gradient, in the order given
        (forward order for model.parameters()); returns once done unless `wait_in_forward` was called.
        The learning rate and other settings are read now, so a schedule that changes them after
        this call affects the next step, as with torch optimizers."""
        self._drain()
        scale = None if self._grad_scale == 1.0 else torch.tensor(1.0 / self._grad_scale, dtype=torch.float32)
        self._grad_scale = 1.0
        for slot in self._slots:
            slot.arrived = 0
            if not slot.landed:
                continue  # no gradient: untouched, moments included, as torch.optim leaves it
            group = slot.group
            settings = {"lr": float(group["lr"]), "beta1": group["betas"][0], "beta2": group["betas"][1],
                        "eps": group["eps"], "weight_decay": group["weight_decay"]}
            slot.ready.clear()
            self._worker.jobs.put(partial(self._update, slot, settings, scale))
        if not self._overlapped:
            self.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forgets the gradients accumulated since the last update, and any clip scale (the loop's
        skip of a non-finite step); there are never any on the device to free."""
        self._grad_scale = 1.0
        for slot in self._slots:
            slot.arrived = 0
        self._worker.jobs.put(self._forget_gradients)

    def wait(self) -> None:
        """Returns once every queued update is done and the device's current stream waits for its weights."""
        self._drain()
        self._wait_for(self._slots)

    def wait_in_forward(self, model: nn.Module) -> None:
        """Makes `step()` return at once: each of the model's blocks (`forward_blocks`) waits
        before its forward for the updates of its own parameters, and model.state_dict() waits for all."""
        claimed: set[nn.Parameter] = set()
        for block in [*forward_blocks(model), model]:
            slots = [self._by_param[p] for p in block.parameters() if p in self._by_param and p not in claimed]
            claimed.update(slot.param for slot in slots)
            if slots:
                # Not traced into a compiled layer's graph: waiting on threads is the host's business.
                hook = torch.compiler.disable(partial(self._before_forward, slots))
                self._hooks.append(block.register_forward_pre_hook(hook))
        self._hooks.append(model.register_state_dict_pre_hook(lambda *_: self.wait()))
        self._overlapped = True

    def close(self) -> None:
        """Waits for the queued work, then removes the hooks, stops the worker thread and unpins
        host memory; the optimizer cannot be used after."""
        self.wait()
        for hook in self._hooks:
            hook.remove()
        self._stop_worker()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain containers only (torch.load(weights_only=True) reads it), per
        parameter index as torch optimizers write it, with the fp32 master weights: the model's
        bf16 weights alone could not resume to the same bits. The tensors are this optimizer's own."""
        self.wait()
        return {
            "state": {slot.index: {"step": slot.step, "master_weight": slot.master.view(slot.param.shape),
                                   "exp_avg": slot.exp_avg.view(slot.param.shape),
                                   "exp_avg_sq": slot.exp_avg_sq.view(slot.param.shape)} for slot in self._slots},
            "param_groups": self._groups_with_indices(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` wrote, and the device weights from the master weights.
        Raises ValueError (or KeyError) when it belongs to other parameters."""
        self.wait()
        ours = self._groups_with_indices()
        if [g["params"] for g in state["param_groups"]] != [g["params"] for g in ours]:
            groups = state["param_groups"]
            raise ValueError(f"the state holds {sum(len(g['params']) for g in groups)} parameters in {len(groups)} "
                             f"groups, this optimizer {len(self._slots)} in {len(ours)}")
        for slot in self._slots:
            saved = state["state"][slot.index]
            if slot.read is not None:
                slot.read.synchronize()
            if saved["master_weight"].shape != slot.param.shape:
                raise ValueError(f"parameter {slot.index} has shape {tuple(slot.param.shape)}, "
                                 f"the state {tuple(saved['master_weight'].shape)}")
            slot.step.copy_(saved["step"])
            for name, mine in (("master_weight", slot.master), ("exp_avg", slot.exp_avg),
                               ("exp_avg_sq", slot.exp_avg_sq)):
                mine.copy_(saved[name].reshape(-1))
            self._send(slot)  # through the device's fp32 chunk: a resume takes no more GPU memory than a step
        self._wait_for(self._slots)
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _groups_with_indices(self) -> list[dict[str, Any]]:
        indices = iter(range(len(self._slots)))
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": [next(indices) for _ in g["params"]]}
                for g in self.param_groups]

    def _grad_ready(self, slot: _Slot, param: nn.Parameter) -> None:
        """Post-accumulate-grad hook (the autograd thread): the gradient leaves for the host and
        its device memory is given back, once the copy has read it."""
        self._raise_if_failed()
        grad = param.grad
        if self._device_chunks is not None:
            self._accumulate_on_device(slot, grad)
            param.grad = None
            return
        region = self._ring.reserve(grad.numel(), self._raise_if_failed)
        copied = None
        if grad.is_cuda:
            self._to_host.wait_stream(torch.cuda.current_stream(grad.device))
            with torch.cuda.stream(self._to_host):
                region.copy_(grad.reshape(-1), non_blocking=True)
                copied = torch.cuda.Event(blocking=True)  # the worker sleeps on it, leaving its core to the others
                copied.record()
            grad.record_stream(self._to_host)
        else:
            region.copy_(grad.reshape(-1))
        param.grad = None
        self._worker.jobs.put(partial(self._land, slot, region, copied))

    def _accumulate_on_device(self, slot: _Slot, grad: torch.Tensor) -> None:
        """The gradient into its host accumulator, chunk by chunk: copied for the step's first
        micro-batch, added on the device for the others (the accumulator's chunk streamed in,
        added to, streamed back out); with the step's last (as many as the step before had) the
        sum's squared norm is taken on the device too."""
        first, last = slot.arrived == 0, slot.arrived + 1 == self._micro_batches
        slot.arrived += 1
        flat, accum = grad.reshape(-1), slot.accum
        sumsq = torch.zeros((), dtype=torch.float64, device=grad.device) if last else None
        cuda = grad.is_cuda
        if cuda:
            compute = torch.cuda.current_stream(grad.device)
            self._fetch.wait_stream(compute)
            if slot.accumulated is not None:  # the previous micro-batch's copy out of this accumulator
                self._fetch.wait_event(slot.accumulated)
        for i, (lo, hi) in enumerate(_chunks(flat.numel(), self._device_chunks[0].numel())):
            chunk = self._device_chunks[i % 2][:hi - lo]
            with torch.cuda.stream(self._fetch) if cuda else contextlib.nullcontext():
                if cuda and self._chunk_free[i % 2] is not None:
                    self._fetch.wait_event(self._chunk_free[i % 2])
                if first:
                    chunk.copy_(flat[lo:hi])
                else:
                    chunk.copy_(accum[lo:hi], non_blocking=True)
                    chunk.add_(flat[lo:hi])
                if sumsq is not None:  # in fp32 chunk by chunk, as `squared_norm` takes it on the host
                    values = chunk.float()
                    sumsq += torch.dot(values, values)
                filled = torch.cuda.Event() if cuda else None
                if cuda:
                    filled.record()
            with torch.cuda.stream(self._to_host) if cuda else contextlib.nullcontext():
                if cuda:
                    self._to_host.wait_event(filled)
                accum[lo:hi].copy_(chunk, non_blocking=cuda)
                if cuda:
                    self._chunk_free[i % 2] = torch.cuda.Event()
                    self._chunk_free[i % 2].record()
        if cuda:
            slot.accumulated = torch.cuda.Event(blocking=True)  # the worker sleeps on it
            slot.accumulated.record(self._to_host)
            for used in (grad, flat, sumsq):  # read on the side streams after this returns (flat: a copy, if any)
                if used is not None:
                    used.record_stream(self._fetch)
        self._worker.jobs.put(partial(self._accumulated, slot, slot.accumulated if cuda else None, sumsq))

    def _before_forward(self, slots: list[_Slot], module: nn.Module, args: Any) -> None:
        self._wait_for(slots)

    def _wait_for(self, slots: list[_Slot]) -> None:
        for slot in slots:
            slot.ready.wait()
            if slot.sent is not None:
                torch.cuda.current_stream(self.device).wait_event(slot.sent)
                slot.sent = None
        self._raise_if_failed()

    def _drain(self) -> None:
        """Waits until the worker has done every job queued so far."""
        if not self._worker.thread.is_alive():
            raise RuntimeError("the optimizer was closed")
        done = threading.Event()
        self._worker.jobs.put(done.set)
        done.wait()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._worker.error is not None:
            error = self._worker.error
            raise RuntimeError("the CPU AdamW worker failed; this run's optimizer state is lost") from error

    # The worker's side: jobs run one at a time, in order. After a failure each job only
    # releases what others wait for, and the main thread raises at its next call.

    def _land(self, slot: _Slot, region: torch.Tensor, copied: Any) -> None:
        """Adds a landed gradient into its accumulator."""
        try:
            if self._worker.error is not None:
                return
            if copied is not None:
                copied.synchronize()
            last = slot.landed + 1 == self._micro_batches
            slot.sumsq = accumulate(slot.accum, region, not slot.landed, self._scratch, norm=last)
            slot.landed += 1
            self._emit("grad_copied", slot.index)
        finally:
            self._ring.release()

    def _accumulated(self, slot: _Slot, done: Any, sumsq: torch.Tensor | None) -> None:
        """Counts a gradient the device added into its accumulator, once its last copy has run."""
        if self._worker.error is not None:
            return
        if done is not None:
            done.synchronize()
        # read on the side stream that computed it: on the default stream the read would wait for backward
        with torch.cuda.stream(self._fetch) if done is not None else contextlib.nullcontext():
            slot.sumsq = None if sumsq is None else float(sumsq)
        slot.landed += 1
        self._emit("grad_copied", slot.index)

    def _update(self, slot: _Slot, settings: dict[str, float], grad_scale: torch.Tensor | None) -> None:
        """AdamW on one parameter's fp32 master and moments (the clip scale divides the gradient
        inside the kernel), then the new weights back to the device."""
        try:
            if self._worker.error is not None:
                return
            slot.step += 1
            if slot.read is not None:
                slot.read.synchronize()  # the last step's copy to the GPU, long done
            adamw_update(slot.master, slot.accum, slot.exp_avg, slot.exp_avg_sq, slot.step, self._scratch, settings,
                         grad_scale)
            slot.landed, slot.sumsq = 0, None
            self._emit("stepped", slot.index)
            self._send(slot)
            self._emit("weight_copied", slot.index)
        finally:
            slot.ready.set()

    def _send(self, slot: _Slot) -> None:
        """The fp32 master weights into the model's weights, rounded on the way (on the GPU: chunk
        by chunk through one fp32 chunk of device memory, in one stream's order)."""
        with torch.no_grad():
            if not slot.param.is_cuda:
                slot.param.copy_(slot.master.view(slot.param.shape))
                return
            flat = slot.param.view(-1)
            with torch.cuda.stream(self._to_device):
                for lo, hi in _chunks(flat.numel(), self._staging.numel()):
                    staged = self._staging[:hi - lo]
                    staged.copy_(slot.master[lo:hi], non_blocking=True)
                    flat[lo:hi].copy_(staged)
                slot.sent = slot.read = torch.cuda.Event(blocking=True)
                slot.sent.record()

    def _forget_gradients(self) -> None:
        for slot in self._slots:
            slot.landed, slot.sumsq = 0, None

    def _emit(self, kind: str, index: int) -> None:
        if self.on_event is not None:
            self.on_event(kind, index)


def accumulate(total: torch.Tensor, grad: torch.Tensor, first: bool, scratch: torch.Tensor,
               norm: bool = False) -> float | None:
    """Adds `grad` into `total` (copies it for the first micro-batch) in one pass over each: the
    host's memory bandwidth is what a micro-batch waits on. With `norm`, returns the squared norm
    of the sum, taken chunk by chunk while each chunk is in cache (the chunks of `squared_norm`,
    so the two agree to the bit); else None. Mixed dtypes go through the fp32 scratch chunk by chunk,
    since an in-place add of a bf16 tensor into an fp32 one makes a whole-tensor fp32 copy on the CPU."""
    if not norm and (first or grad.dtype == total.dtype):
        total.copy_(grad) if first else total.add_(grad)
        return None
    sumsq = 0.0
    for lo, hi in _chunks(total.numel(), scratch.numel()):
        part, new = total[lo:hi], grad[lo:hi]
        if first:
            part.copy_(new)
        elif new.dtype == part.dtype:
            part.add_(new)
        else:
            part.add_(scratch[:hi - lo].copy_(new))
        if norm:
            sumsq += _squared(part, scratch)
    return sumsq if norm else None


def squared_norm(values: torch.Tensor, scratch: torch.Tensor) -> float:
    """The sum of squares of `values` in fp32, chunk by chunk through the fp32 scratch when they
    are not fp32. Taken once a step, of the accumulated gradient, not once a micro-batch."""
    return sum(_squared(values[lo:hi], scratch) for lo, hi in _chunks(values.numel(), scratch.numel()))


def _squared(part: torch.Tensor, scratch: torch.Tensor) -> float:
    part = part if part.dtype == torch.float32 else scratch[:part.numel()].copy_(part)
    return float(torch.dot(part, part))


def adamw_update(
    master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: torch.Tensor,
    scratch: torch.Tensor, settings: dict[str, float], grad_scale: torch.Tensor | None,
) -> None:
    """torch's fused AdamW kernel (what torch.optim.AdamW(fused=True) runs, without its
    per-call bookkeeping) over flat fp32 tensors chunk by chunk, a gradient in another dtype
    converted into the fp32 scratch chunk by chunk while in cache. `grad_scale` divides the
    gradient (the clip scale's inverse); `step` is already counted."""
    for lo, hi in _chunks(master.numel(), scratch.numel()):
        g = grad[lo:hi] if grad.dtype == torch.float32 else scratch[:hi - lo].copy_(grad[lo:hi])
        torch._fused_adamw_([master[lo:hi]], [g], [exp_avg[lo:hi]], [exp_avg_sq[lo:hi]], [], [step],
                            amsgrad=False, maximize=False, grad_scale=grad_scale, **settings)


def _chunks(numel: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, numel, size):
        yield lo, min(lo + size, numel)


class _Worker:
    """The thread that runs the optimizer's jobs one at a time, in order, keeping the first error
    for the main thread. It holds no reference to the optimizer, so dropping the optimizer (or
    calling its `close()`) stops the thread and unpins the host buffers."""

    def __init__(self, pinned: list[torch.Tensor]) -> None:
        self.jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self.error: BaseException | None = None
        self.pinned = pinned
        self.thread = threading.Thread(target=self._run, name="tunelite-cpu-adamw", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                job()
            except BaseException as error:  # noqa: BLE001 (handed to the main thread)
                self.error = self.error or error

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        for buffer in self.pinned:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        self.pinned = []


def _param_groups(params: Iterable[Any], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """torch.optim's convention: parameters, or dicts of them with settings that override the defaults."""
    given = list(params)
    groups = given if given and isinstance(given[0], dict) else [{"params": given}]
    groups = [{**defaults, **group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
    if not any(group["params"] for group in groups):
        raise ValueError("the optimizer got no parameters that require gradients")
    return groups


def _staging_numel(numels: list[int], dtype: torch.dtype, gib: float | None) -> int:
    """Room for the largest gradient twice over at least (one lands while the worker adds the one
    before), or `gib` of them where that is more. By default STAGING_GIB, or every gradient where
    they take less: a ring that holds a micro-batch's burst lets backward run on while the host
    catches up (call 27)."""
    if gib is None:
        wanted = min(int(STAGING_GIB * GIB) // dtype.itemsize, sum(numels))
    else:
        wanted = int(gib * GIB) // dtype.itemsize
    return max(2 * max(numels), wanted)


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _host_buffer(numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A flat host buffer, page-locked for a GPU's asynchronous copies. Registered in place rather
    than taken from torch's pinned allocator, which rounds every block up to a power of two (a
    17 GiB buffer would take 32). The optimizer's worker unpins it when it stops."""
    buffer = torch.empty(numel, dtype=dtype)
    if pinned:
        try:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), numel * dtype.itemsize, 0))
        except torch.cuda.CudaError as error:
            raise ResourceError(f"the overlapped CPU AdamW could not pin {numel * dtype.itemsize / GIB:.1f} GiB of host "
                                f"memory ({error}). Free host memory, or raise the locked-memory limit (ulimit -l) "
                                "where one is set") from None
    return buffer
