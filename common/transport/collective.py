"""The collective weight transport: the learner broadcasts bucketed weights to every generator
over a process group of its own (nccl on GPUs, gloo on CPU: one code path), with a deadline.

The group is the learner's sending rank (rank 0) and every generator (rank ``1 + index``). It
is separate from any default ``torch.distributed`` group (the learner ranks' FSDP group): a
``ProcessGroupGloo`` or ``ProcessGroupNCCL`` built directly on a ``TCPStore`` that the job
driver serves (``GroupSpec`` says where), so re-forming it never touches the default group.

A sync is a stream of buckets: a small ``int64`` head ``[header bytes, payload bytes, version,
last]``, then one ``uint8`` payload broadcast per bucket holding a JSON header (each tensor's
name, dtype, shape and offset; metadata first), the tensors, cast to the engine's dtype and
packed up to ``bucket_mb`` (a tensor larger than that travels alone), and at its end the next
bucket's head (the trailer; ``last`` set after the last bucket, carrying the version). A tensor
sharing storage with one sent before (a tied ``lm_head.weight``) is not sent: the engine's model
ties it as the learner's does.

The trailer lets a receiver post the next bucket's broadcast as soon as one arrived, so that the
next bucket travels (in the process group's own thread) while the engine loads this one: the
sender packs one bucket ahead to know the next head.

Never hangs: every operation waits at most until the sync's deadline (``timeout_s`` after it
started; forming the group has its own). A peer that died makes the others' operations fail
(gloo: connection closed; nccl: the deadline), a stalled one makes them time out; either way
the member gives up its group (nccl: ``abort``) and raises ``CollectiveError``, and stays
usable: the driver re-forms the group (``job/sync.py``).

Listens on one address only (``rendezvous.py``): the store's server on the address it is served
at, and gloo's connections on the address that reaches it: 127.0.0.1 in a local job, the node's
address on a cluster.
"""

from __future__ import annotations

import json
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import count
from typing import Any

import numpy as np
import torch

from rlfleet.common.transport.packing import ALIGNMENT, Bucket
from rlfleet.common.transport.rendezvous import local_address

HEAD_FIELDS = 4
"""The head of a bucket: header bytes, payload bytes, policy version, last flag (no bucket
follows: the stream ended)."""

TRAILER_BYTES = HEAD_FIELDS * 8
"""Each payload ends with the next bucket's head."""

BUCKETS_IN_FLIGHT = 2
"""Buckets the sender may have on the wire while it packs the next one."""


class CollectiveError(RuntimeError):
    """A collective operation failed or missed its deadline; the group is unusable."""


@dataclass(frozen=True)
class GroupSpec:
    """Where and how the members of one weight group meet. Rank 0 is the learner's sender;
    generator ``i`` is rank ``1 + i``. A new group (after a failure or a restart) has a new
    ``group_id`` and a new store port."""

    host: str
    port: int
    world_size: int
    group_id: int
    backend: str
    """``"nccl"`` (GPUs) or ``"gloo"`` (CPU)."""
    timeout_s: float
    """Deadline of forming the group, and of each sync."""

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight group backend must be gloo or nccl, not {self.backend!r}")


@dataclass(frozen=True)
class CollectiveHandle:
    """A sync through group ``group_id``: what the driver hands every generator (``version``
    None: the version arrives in the stream) and what the learner returns once it has sent."""

    group_id: int
    version: int | None = None
    nbytes: int = 0
    """Bytes broadcast (tensors and headers)."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _dtype(self.dtype).itemsize


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _seconds_left(deadline: float) -> float:
    return deadline - time.monotonic()


class WeightGroup:
    """One member's end of a weight group: broadcasts from rank 0, each bounded by a
    deadline."""

    def __init__(self, spec: GroupSpec, rank: int) -> None:
        """Joins the group (every member must join within ``spec.timeout_s``).

        Every member first waits in the store, with the deadline, until all have checked in:
        nccl's communicator setup with a missing peer was seen blocking past any deadline (on
        an H200, torch 2.11, NCCL 2.28, even non-blocking), so it starts only once all are
        there."""
        from torch.distributed import TCPStore

        self.spec = spec
        self.rank = rank
        self.device = _group_device(spec.backend)
        deadline = time.monotonic() + spec.timeout_s
        self._group = None
        try:
            self._store = TCPStore(
                spec.host, spec.port, is_master=False, timeout=timedelta(seconds=spec.timeout_s)
            )
            self.address = local_address(spec.host, spec.port)
            self._await_members(deadline)
            self._group = _process_group(spec, rank, self._store, self.address)
            self._barrier(deadline)
        except Exception as exc:
            self.close()
            raise CollectiveError(
                f"rank {rank} could not join weight group {spec.group_id} at "
                f"{spec.host}:{spec.port} within {spec.timeout_s:g} s: {exc}"
            ) from exc

    def broadcast(self, tensor: torch.Tensor, deadline: float) -> None:
        """Broadcasts ``tensor`` from rank 0 in place and waits for it; raises
        ``CollectiveError`` (and gives up the group) when it fails or the deadline passes."""
        self.wait(self.start_broadcast(tensor, deadline), deadline)

    def start_broadcast(self, tensor: torch.Tensor, deadline: float) -> Any:
        """Starts broadcasting ``tensor`` from rank 0; ``wait`` for the returned work. Works
        complete in the order they were started (every member starts the same sequence)."""
        from torch.distributed import BroadcastOptions

        with self._failing("broadcast"):
            if self._group is None:
                raise RuntimeError("the group was given up")
            if _seconds_left(deadline) <= 0:
                raise TimeoutError("the deadline passed before the broadcast started")
            options = BroadcastOptions()
            options.rootRank = 0
            return self._group.broadcast([tensor], options)

    def wait(self, work: Any, deadline: float) -> None:
        with self._failing("broadcast"):
            left = _seconds_left(deadline)
            if left <= 0 or not work.wait(timedelta(seconds=left)):
                raise TimeoutError("the deadline passed")

    @contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """Any failure inside gives up the group and becomes a ``CollectiveError``."""
        try:
            yield
        except Exception as exc:
            self.close()
            raise CollectiveError(
                f"weight group {self.spec.group_id}, rank {self.rank}: {what} failed "
                f"({self.spec.timeout_s:g} s deadline): {exc}"
            ) from exc

    def close(self) -> None:
        """Gives up the group (nccl: aborts its communicator, so nothing stays blocked)."""
        group, self._group = getattr(self, "_group", None), None
        if group is not None and hasattr(group, "abort"):
            try:
                group.abort()
            except Exception:  # noqa: BLE001 - giving up a broken group must not fail
                pass
        self._store = None

    def _await_members(self, deadline: float) -> None:
        self._store.set(f"member/{self.rank}", "1")
        keys = [f"member/{rank}" for rank in range(self.spec.world_size)]
        self._store.wait(keys, timedelta(seconds=max(0.001, _seconds_left(deadline))))

    def _barrier(self, deadline: float) -> None:
        """One tiny broadcast: nccl builds its communicator lazily, so the group exists (and
        every member has joined) only once a first collective went through."""
        self.broadcast(torch.zeros(1, dtype=torch.int64, device=self.device), deadline)


def _group_device(backend: str) -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


def _process_group(spec: GroupSpec, rank: int, store, address: str) -> object:
    """A gloo or nccl process group on ``store`` that is no part of ``torch.distributed``'s
    default group. gloo: its connections listen on ``address`` (``local_address``; by default
    gloo takes the address this machine's hostname resolves to). nccl: a non-blocking
    communicator (``config.blocking = 0``, so that its ``abort`` does not wait either), whose
    own watchdog gets twice the deadline: the member aborts first (waits with the deadline,
    then ``close``)."""
    timeout = timedelta(seconds=spec.timeout_s)
    if spec.backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        options = ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [ProcessGroupGloo.create_device(hostname=address)]
        return ProcessGroupGloo(store, rank, spec.world_size, options)
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = 2 * timeout
    options.config.blocking = 0
    return ProcessGroupNCCL(store, rank, spec.world_size, options)


# -- the sender ------------------------------------------------------------------------------


@dataclass
class _BucketPlan:
    """Tensors of one bucket: header entries and the tensors to copy at their offsets."""

    entries: list[TensorEntry] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype)


def unique_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors but those holding the same storage as an earlier one that is still
    alive (a tied weight seen twice).

    Earlier tensors are held by weak reference only: a sharded learner gathers each full
    tensor anew and frees it, and a freed tensor's address may be reused by the next one."""
    seen: dict[tuple, weakref.ref] = {}
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weights[{name!r}] is a {type(tensor).__name__}, not a tensor")
        key = _storage_key(tensor)
        earlier = seen.get(key)
        if earlier is not None and earlier() is not None:
            continue
        seen[key] = weakref.ref(tensor)
        yield name, tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating-point tensors in the engine's dtype; others (integer buffers) as they are."""
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


def plan_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    dtype: torch.dtype | None,
) -> Iterator[_BucketPlan]:
    """Buckets of at most ``bucket_bytes`` (a larger tensor alone), tensors cast to
    ``dtype``; each bucket is yielded as soon as it is full, so at most one bucket's tensors
    are held at once."""
    plan = _BucketPlan()
    for name, tensor in unique_named_tensors(named_tensors):
        tensor = _cast(tensor, dtype)
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        size = tensor.numel() * tensor.element_size()
        if plan.tensors and _aligned(plan.nbytes) + size > bucket_bytes:
            yield plan
            plan = _BucketPlan()
        offset = _aligned(plan.nbytes)
        plan.entries.append(TensorEntry(name, dtype_name, tuple(tensor.shape), offset))
        plan.tensors.append(tensor)
        plan.nbytes = offset + size
    if plan.entries:
        yield plan


def _encode_header(entries: list[TensorEntry]) -> bytes:
    rows = [[e.name, e.dtype, list(e.shape), e.offset] for e in entries]
    return json.dumps(rows, separators=(",", ":")).encode()


def _decode_header(raw: bytes) -> list[TensorEntry]:
    return [
        TensorEntry(name, dtype, tuple(shape), offset)
        for name, dtype, shape, offset in json.loads(raw)
    ]


def _copy_into(payload: torch.Tensor, start: int, tensor: torch.Tensor) -> None:
    """Copies ``tensor``'s bytes to ``payload[start:]``. On CPU a numpy slice assignment
    (single-threaded memcpy, as in ``packing.pack_state_dict``: torch's multi-threaded copy
    crawls on a loaded machine)."""
    raw = tensor.contiguous().reshape(-1).view(torch.uint8)
    if payload.device.type == "cpu" and raw.device.type == "cpu":
        payload.numpy()[start : start + raw.numel()] = raw.numpy()
    else:
        payload[start : start + raw.numel()].copy_(raw, non_blocking=True)


class Buffers:
    """Byte buffers by slot, kept from one sync to the next on CPU: fresh memory costs a page
    fault per 4 KiB page on first touch, about what copying into it costs. On GPUs none are kept
    (free GPU memory is the engine's KV cache and the learner's activations)."""

    def __init__(self) -> None:
        self._slots: dict[int, torch.Tensor] = {}

    def take(self, slot: int, nbytes: int, device: torch.device) -> torch.Tensor:
        """``nbytes`` of slot ``slot`` (the slot's earlier contents are overwritten)."""
        if device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        buffer = self._slots.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._slots[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes]


@dataclass(frozen=True)
class _Layout:
    """Where a bucket's parts lie in its payload."""

    header: bytes
    data_start: int
    trailer_start: int

    @classmethod
    def of(cls, plan: _BucketPlan) -> _Layout:
        header = _encode_header(plan.entries)
        data_start = _aligned(len(header))
        return cls(header, data_start, _aligned(data_start + plan.nbytes))

    @property
    def nbytes(self) -> int:
        return self.trailer_start + TRAILER_BYTES


def _head_values(plan: _BucketPlan | None, version: int) -> list[int]:
    """The head announcing ``plan`` (None: the end of the stream)."""
    if plan is None:
        return [0, 0, version, 1]
    layout = _Layout.of(plan)
    return [len(layout.header), layout.nbytes, version, 0]


def _payload(
    plan: _BucketPlan, next_head: list[int], device: torch.device, buffers: Buffers, slot: int
) -> torch.Tensor:
    """The bucket's payload: header, tensors, then the next bucket's head."""
    layout = _Layout.of(plan)
    payload = buffers.take(slot, layout.nbytes, device)
    _copy_into(payload, 0, torch.frombuffer(bytearray(layout.header), dtype=torch.uint8))
    for entry, tensor in zip(plan.entries, plan.tensors, strict=True):
        _copy_into(payload, layout.data_start + entry.offset, tensor)
    _copy_into(payload, layout.trailer_start, torch.tensor(next_head, dtype=torch.int64))
    return payload


def send_weights(
    group: WeightGroup,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    bucket_bytes: int,
    dtype: torch.dtype | None,
    buffers: Buffers,
) -> int:
    """Rank 0: broadcasts the first head, then every bucket (each ending with the next one's
    head); returns the bytes broadcast. The deadline is the group's timeout from now.

    Each bucket is packed (and the one after it gathered, for its head) while the last
    ``BUCKETS_IN_FLIGHT`` are on the wire (their tensors stay referenced until their broadcast
    completed); bucket ``k`` is packed into slot ``k % (BUCKETS_IN_FLIGHT + 1)`` of
    ``buffers``, whose last broadcast has completed by then."""
    deadline = time.monotonic() + group.spec.timeout_s
    plans = plan_buckets(named_tensors, bucket_bytes, dtype)
    plan = next(plans, None)
    head = torch.tensor(_head_values(plan, version), dtype=torch.int64, device=group.device)
    in_flight: deque[tuple[Any, torch.Tensor]] = deque()
    in_flight.append((group.start_broadcast(head, deadline), head))
    sent = head.numel() * head.element_size()
    for index in count():
        if plan is None:
            break
        following = next(plans, None)
        slot = index % (BUCKETS_IN_FLIGHT + 1)
        payload = _payload(plan, _head_values(following, version), group.device, buffers, slot)
        in_flight.append((group.start_broadcast(payload, deadline), payload))
        while len(in_flight) > BUCKETS_IN_FLIGHT:
            group.wait(in_flight.popleft()[0], deadline)
        sent += payload.numel()
        plan = following
    while in_flight:
        group.wait(in_flight.popleft()[0], deadline)
    return sent


# -- a receiver ------------------------------------------------------------------------------


def _bucket(payload: torch.Tensor, header_bytes: int) -> Bucket:
    """``(name, tensor)`` views of a received payload (no copy)."""
    header = bytes(payload[:header_bytes].cpu().numpy())
    data = payload[_aligned(header_bytes) :]
    return [
        (
            entry.name,
            data[entry.offset : entry.offset + entry.nbytes]
            .view(_dtype(entry.dtype))
            .view(entry.shape),
        )
        for entry in _decode_header(header)
    ]


def _read_head(head: torch.Tensor) -> tuple[int, int, int, bool]:
    header_bytes, payload_bytes, version, last = (int(x) for x in head.cpu().tolist())
    return header_bytes, payload_bytes, version, bool(last)


def receive_weights(
    group: WeightGroup, on_end: Callable[[int], None], buffers: Buffers
) -> Iterator[Bucket]:
    """A member other than rank 0: yields each bucket as it arrives (views of its slot of
    ``buffers``, valid until the next sync), the next bucket already on its way while the
    caller loads one (two buckets' memory at once); when the stream ends, calls ``on_end`` with
    the version it carried."""
    deadline = time.monotonic() + group.spec.timeout_s
    head = torch.empty(HEAD_FIELDS, dtype=torch.int64, device=group.device)
    group.broadcast(head, deadline)
    header_bytes, payload_bytes, version, last = _read_head(head)
    payload = None if last else buffers.take(0, payload_bytes, group.device)
    work = None if payload is None else group.start_broadcast(payload, deadline)
    for slot in count(1):
        if payload is None:
            on_end(version)
            return
        group.wait(work, deadline)
        bucket = _bucket(payload, header_bytes)
        header_bytes, payload_bytes, version, last = _read_head(
            payload[-TRAILER_BYTES:].view(torch.int64)
        )
        payload = None if last else buffers.take(slot, payload_bytes, group.device)
        work = None if payload is None else group.start_broadcast(payload, deadline)
        yield bucket


# -- the transport's two ends ----------------------------------------------------------------


class CollectivePublisher:
    """The learner's end: joins each new group as rank 0 and broadcasts every sync.

    ``sender`` False (a learner rank other than 0): joins nothing, and ``publish`` only runs
    through the tensors (gathering them is collective on a sharded learner)."""

    def __init__(
        self, bucket_mb: float = 256.0, dtype: torch.dtype | None = None, sender: bool = True
    ) -> None:
        self.bucket_bytes = max(ALIGNMENT, int(bucket_mb * 2**20))
        self.dtype = dtype
        self.sender = sender
        self._group: WeightGroup | None = None
        self._buffers = Buffers()

    def join(self, spec: GroupSpec) -> None:
        """Leaves the current group (if any) and joins ``spec``'s as rank 0."""
        self.close()
        if self.sender:
            self._group = WeightGroup(spec, 0)

    def publish(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> CollectiveHandle | None:
        """Broadcasts the weights to the group's generators (which must be receiving now);
        None on a rank that does not send. A failure gives up the group and raises
        ``CollectiveError``; the publisher stays usable once it joins a new one."""
        if not self.sender:
            for _ in named_tensors:
                pass
            return None
        group = self._require_group()
        try:
            nbytes = send_weights(
                group, named_tensors, version, self.bucket_bytes, self.dtype, self._buffers
            )
        except BaseException:
            self.close()  # the receivers are mid-stream: this group cannot carry another sync
            raise
        return CollectiveHandle(group.spec.group_id, version, nbytes)

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def _require_group(self) -> WeightGroup:
        if self._group is None:
            raise CollectiveError("the learner is in no weight group: join one first")
        return self._group


class CollectiveReceiver:
    """A generator's end: joins each new group as its rank and receives every sync."""

    def __init__(self) -> None:
        self._group: WeightGroup | None = None
        self._buffers = Buffers()
        self.version: int | None = None
        """The version the last complete ``receive`` delivered."""

    def join(self, spec: GroupSpec, rank: int) -> None:
        self.close()
        self._group = WeightGroup(spec, rank)

    def receive(self, handle: CollectiveHandle) -> Iterator[Bucket]:
        if not isinstance(handle, CollectiveHandle):
            raise TypeError(f"expected a CollectiveHandle, got {type(handle).__name__}")
        group = self._group
        if group is None or group.spec.group_id != handle.group_id:
            joined = "none" if group is None else group.spec.group_id
            raise CollectiveError(
                f"this generator is in weight group {joined}, the sync is in {handle.group_id}"
            )
        self.version = None
        finished = False
        try:
            yield from receive_weights(group, self._received, self._buffers)
            finished = True
        finally:
            if not finished:  # a failure here or in loading: the stream cannot be resumed
                self.close()

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def _received(self, version: int) -> None:
        self.version = version
