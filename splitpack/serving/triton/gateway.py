"""The gRPC front door of a Triton deployment: request-size limit, retry on a dead instance.

Triton 2.51 accepts gRPC messages up to 2 GiB (``MAX_GRPC_MESSAGE_SIZE = INT32_MAX``
in the server, no flag to lower it; ``--http-max-input-size`` only exists in later
releases), buffers the whole body and copies it into the python backend's shared
memory, which never shrinks: a 1 GiB request leaves the server 4.5 GiB larger. The
gateway listens on the public port and forwards every call, byte for byte, to the
tritonserver on an internal loopback port. gRPC refuses a message longer than
``max_request_bytes`` from its 5-byte length prefix, before reading the body
(RESOURCE_EXHAUSTED, no memory used), so the limit holds before anything is buffered.

It also hides a python-backend instance whose stub process died: such an instance
answers ``Stub process '<instance>' is not healthy`` (INTERNAL) until the model is
reloaded (:mod:`splitpack.serving.triton.supervisor` does that). An inference that
fails that way is retried on the model's other instances and reported to the
supervisor, so it reloads at once instead of at its next check.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Protocol

import grpc

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
INFER = SERVICE + "ModelInfer"
STREAMING = {SERVICE + "ModelStreamInfer"}
DEAD_INSTANCE = "is not healthy"  # python backend: "Stub process '<instance>' is not healthy."
# Transport headers gRPC sets itself; forwarding them is refused or wrong.
_HOP_HEADERS = ("user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout")
_MAX_RESPONSE_BYTES = 1 << 30
_NO_DEADLINE_S = 7 * 24 * 3600


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class GatewayLimits:
    """What the gateway refuses before Triton sees the request."""

    max_request_bytes: int = 32 << 20  # the same default as TorchServe's max_request_size here
    dead_instance_retries: int = 4  # immediate retries, landing on the model's other instances
    recovery_wait_s: float = 60.0  # then wait (within the caller's deadline) for the reload, once


class Recoverer(Protocol):
    """What the gateway needs from the supervisor."""

    generation: int

    def wake(self, reason: str = "") -> None: ...

    def wait_recovered(self, generation: int, timeout: float) -> bool: ...


def remaining_time(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline for the upstream call; None when the caller set none (grpc then
    reports an effectively infinite remaining time, which must not be passed on)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


def is_dead_instance(err: grpc.RpcError) -> bool:
    return err.code() == grpc.StatusCode.INTERNAL and DEAD_INSTANCE in (err.details() or "")


def forwarded_metadata(metadata) -> list[tuple[str, str | bytes]]:
    """The caller's headers minus the transport's own (``:authority``, ``grpc-*``, ``user-agent``...)."""
    return [(k, v) for k, v in (metadata or ()) if not k.startswith(":") and k not in _HOP_HEADERS]


class Forwarder(grpc.GenericRpcHandler):
    """Every method of Triton's gRPC service, forwarded as opaque bytes to ``upstream``."""

    def __init__(self, upstream: grpc.Channel, limits: GatewayLimits, supervisor: Recoverer | None = None):
        self.upstream = upstream
        self.limits = limits
        self.supervisor = supervisor
        self._calls: dict[str, Callable] = {}
        self._lock = threading.Lock()

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method in STREAMING:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method), request_deserializer=_identity, response_serializer=_identity)
        return grpc.unary_unary_rpc_method_handler(
            self._unary(method), request_deserializer=_identity, response_serializer=_identity)

    def _callable(self, method: str, streaming: bool = False):
        with self._lock:
            if method not in self._calls:
                make = self.upstream.stream_stream if streaming else self.upstream.unary_unary
                self._calls[method] = make(method, request_serializer=_identity, response_deserializer=_identity)
            return self._calls[method]

    def _unary(self, method: str):
        call = self._callable(method)
        retry = method == INFER

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = forwarded_metadata(context.invocation_metadata())
            try:
                return call(request, metadata=metadata, timeout=remaining_time(context))
            except grpc.RpcError as err:
                if not (retry and is_dead_instance(err)):
                    context.abort(err.code(), err.details() or "")
                return self._retry_dead_instance(call, request, metadata, context, err)

        return handle

    def _retry_dead_instance(self, call, request: bytes, metadata, context, err: grpc.RpcError) -> bytes:
        """Retry on the other instances at once; if they are dead too, wait once for the reload."""
        generation = self.supervisor.generation if self.supervisor else 0
        if self.supervisor:
            self.supervisor.wake(err.details() or "")
        for attempt in range(self.limits.dead_instance_retries + 1):
            if attempt == self.limits.dead_instance_retries:
                if not self.supervisor:
                    break
                wait = min(self.limits.recovery_wait_s, remaining_time(context) or self.limits.recovery_wait_s)
                self.supervisor.wait_recovered(generation, wait)
            try:
                return call(request, metadata=metadata, timeout=remaining_time(context))
            except grpc.RpcError as again:
                err = again
                if not is_dead_instance(err):
                    break
        context.abort(err.code(), err.details() or "")

    def _stream(self, method: str):
        call = self._callable(method, streaming=True)

        def handle(requests, context: grpc.ServicerContext):
            metadata = forwarded_metadata(context.invocation_metadata())
            try:
                yield from call(requests, metadata=metadata, timeout=remaining_time(context))
            except grpc.RpcError as err:
                context.abort(err.code(), err.details() or "")

        return handle


class Gateway:
    """A gRPC server on ``address`` forwarding to Triton at ``upstream_url`` within ``limits``."""

    def __init__(self, address: str, upstream_url: str, limits: GatewayLimits | None = None,
                 supervisor: Recoverer | None = None, threads: int = 32):
        self.limits = limits or GatewayLimits()
        self.channel = grpc.insecure_channel(upstream_url, options=[
            ("grpc.max_send_message_length", self.limits.max_request_bytes),
            ("grpc.max_receive_message_length", _MAX_RESPONSE_BYTES),
        ])
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gateway"),
            handlers=[Forwarder(self.channel, self.limits, supervisor)],
            options=[("grpc.max_receive_message_length", self.limits.max_request_bytes),
                     ("grpc.max_send_message_length", _MAX_RESPONSE_BYTES),
                     ("grpc.so_reuseport", 0)],
        )
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"gateway cannot listen on {address} (in use?)")

    def start(self) -> "Gateway":
        self.server.start()
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        self.server.stop(grace_s).wait()
        self.channel.close()
