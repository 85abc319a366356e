"""The test service's unary call on gRPC C-core (Python grpcio): a peer implementation for
fanout's end-to-end tests, so the proxy is shown against a server that is not tonic.

    python3 grpcio_backend.py --listen 127.0.0.2:50051 --id backend-0 [--grace 5] [--delay-ms 2]

Answers /fanout.test.v1.Test/Unary with an EchoReply naming this backend (the message is
encoded by hand: no generated code, so grpcio alone is enough). On SIGTERM it stops as a
grpcio server is stopped in production, server.stop(grace): no new calls, the calls in
flight get `grace` seconds, then the process exits 0. Prints "listening" once it serves.
"""

import argparse
import signal
import sys
import threading
import time
from concurrent import futures

import grpc


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number, data):
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def read_varint(data, at):
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def delay_ms_of(request):
    """EchoRequest.delay_ms (field 2), skipping the other fields."""
    at = 0
    while at < len(request):
        key, at = read_varint(request, at)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, at = read_varint(request, at)
            if number == 2:
                return value
        elif kind == 2:
            length, at = read_varint(request, at)
            at += length
        elif kind == 1:
            at += 8
        elif kind == 5:
            at += 4
        else:
            return 0
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()

    seq = [0]
    lock = threading.Lock()

    def unary(request, context):
        delay = args.delay_ms + delay_ms_of(request)
        if delay:
            time.sleep(delay / 1000.0)
        with lock:
            seq[0] += 1
            n = seq[0]
        return field_bytes(1, args.id.encode()) + field_varint(3, n)

    handler = grpc.method_handlers_generic_handler(
        "fanout.test.v1.Test",
        {"Unary": grpc.unary_unary_rpc_method_handler(unary)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(args.listen) == 0:
        sys.exit(f"cannot listen on {args.listen}")
    server.start()
    print("listening", flush=True)

    stopped = threading.Event()

    def on_term(*_):
        stopped.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    stopped.wait()
    server.stop(args.grace).wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
