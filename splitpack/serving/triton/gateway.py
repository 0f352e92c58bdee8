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
from typing import Callable

import grpc

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
INFER = SERVICE + "ModelInfer"
STREAMING = {SERVICE + "ModelStreamInfer"}
DEAD_INSTANCE = "is not healthy"  # python backend: "Stub process '<instance>' is not healthy."
# Transport headers gRPC sets itself; forwarding them is refused or wrong.
_HOP_HEADERS = ("user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout")
_MAX_RESPONSE_BYTES = 1 << 30


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class GatewayLimits:
    """What the gateway refuses before Triton sees the request."""

    max_request_bytes: int = 32 << 20  # the same default as TorchServe's max_request_size here
    dead_instance_retries: int = 4


def forwarded_metadata(metadata) -> list[tuple[str, str | bytes]]:
    """The caller's headers minus the transport's own (``:authority``, ``grpc-*``, ``user-agent``...)."""
    return [(k, v) for k, v in (metadata or ()) if not k.startswith(":") and k not in _HOP_HEADERS]


class Forwarder(grpc.GenericRpcHandler):
    """Every method of Triton's gRPC service, forwarded as opaque bytes to ``upstream``."""

    def __init__(self, upstream: grpc.Channel, limits: GatewayLimits,
                 on_dead_instance: Callable[[str], None] | None = None):
        self.upstream = upstream
        self.limits = limits
        self.on_dead_instance = on_dead_instance or (lambda details: None)
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
        attempts = 1 + (self.limits.dead_instance_retries if method == INFER else 0)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = forwarded_metadata(context.invocation_metadata())
            for attempt in range(attempts):
                try:
                    return call(request, metadata=metadata, timeout=context.time_remaining())
                except grpc.RpcError as err:
                    details = err.details() or ""
                    if DEAD_INSTANCE in details and err.code() == grpc.StatusCode.INTERNAL:
                        self.on_dead_instance(details)
                        if attempt + 1 < attempts:
                            continue
                    context.abort(err.code(), details)
            raise AssertionError("unreachable")

        return handle

    def _stream(self, method: str):
        call = self._callable(method, streaming=True)

        def handle(requests, context: grpc.ServicerContext):
            metadata = forwarded_metadata(context.invocation_metadata())
            try:
                yield from call(requests, metadata=metadata, timeout=context.time_remaining())
            except grpc.RpcError as err:
                context.abort(err.code(), err.details() or "")

        return handle


class Gateway:
    """A gRPC server on ``address`` forwarding to Triton at ``upstream_url`` within ``limits``."""

    def __init__(self, address: str, upstream_url: str, limits: GatewayLimits | None = None,
                 on_dead_instance: Callable[[str], None] | None = None, threads: int = 32):
        self.limits = limits or GatewayLimits()
        self.channel = grpc.insecure_channel(upstream_url, options=[
            ("grpc.max_send_message_length", self.limits.max_request_bytes),
            ("grpc.max_receive_message_length", _MAX_RESPONSE_BYTES),
        ])
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gateway"),
            handlers=[Forwarder(self.channel, self.limits, on_dead_instance)],
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
