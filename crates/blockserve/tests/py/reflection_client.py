"""A gRPC client that knows blockserve only through server reflection.

It speaks grpcio-reflection's v1alpha protocol (what grpcurl up to 1.8 and
Python's reflection client use), builds the message classes from the file
descriptors the router sends, and then calls the public API the way outside
clients do, including with bytes that are not valid messages. It prints one
JSON object: for each case, the status code name and message it got. The
Rust test (outside_clients.rs) asserts the exact outcomes.

    python reflection_client.py HOST:PORT
"""

import json
import random
import sys
import threading

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

addr = sys.argv[1]
channel = grpc.insecure_channel(addr)
reflection = reflection_pb2_grpc.ServerReflectionStub(channel)


def reflect(**request):
    return next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)])))


out = {"services": sorted(s.name for s in reflect(list_services="").list_services_response.service)}

# Message classes from the descriptors the server sent, files added once their
# imports are in the pool.
pool = descriptor_pool.DescriptorPool()
files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in reflect(file_containing_symbol="blockserve.v1.Generation").file_descriptor_response.file_descriptor_proto]
added = set()
while len(added) < len(files):
    for f in files:
        if f.name not in added and all(d in added for d in f.dependency):
            pool.Add(f)
            added.add(f.name)


def message(name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("blockserve.v1." + name))


def field(msg, name):
    return pool.FindMessageTypeByName("blockserve.v1." + msg).fields_by_name[name].number


GenerateRequest = message("GenerateRequest")
service = pool.FindServiceByName("blockserve.v1.Generation")


def call(method, payload, metadata=None, timeout=None):
    """Call `method` with raw request bytes; (code name, message) or ("OK", response bytes)."""
    m = service.methods_by_name[method]
    path = "/blockserve.v1.Generation/" + method
    ident = lambda b: b
    try:
        if m.server_streaming:
            responses = channel.unary_stream(path, request_serializer=ident, response_deserializer=ident)(payload, metadata=metadata, timeout=timeout)
            return "OK", list(responses)
        return "OK", channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)(payload, metadata=metadata, timeout=timeout)
    except grpc.RpcError as e:
        return e.code().name, e.details()


def status(method, payload, **kw):
    code, detail = call(method, payload, **kw)
    return [code, detail if code != "OK" else ""]


def length_delimited(number, data):
    """One length-delimited field (wire type 2) in protobuf's encoding."""
    def varint(n):
        b = bytearray()
        while True:
            b.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(b)
    return varint(number << 3 | 2) + varint(len(data)) + data


BAD = b"\xff\xfe not utf-8"
valid = GenerateRequest(text="def f(x):", parameters={"max_new_tokens": 4}).SerializeToString()
rng = random.Random(7)
noise = bytes(rng.randrange(256) for _ in range(64))

# Every public RPC: a string field holding invalid UTF-8, a truncated message,
# random bytes.
cases = {
    "generate_text": ("Generate", length_delimited(field("GenerateRequest", "text"), BAD)),
    "generate_unary_text": ("GenerateUnary", length_delimited(field("GenerateRequest", "text"), BAD)),
    "generate_stop": ("Generate", length_delimited(field("GenerateRequest", "parameters"), length_delimited(field("GenerationParameters", "stop"), BAD))),
    "generate_session_id": ("Generate", length_delimited(field("GenerateRequest", "session_id"), BAD)),
    "resume_session_id": ("Resume", length_delimited(field("ResumeRequest", "session_id"), BAD)),
    "cancel_session_id": ("Cancel", length_delimited(field("CancelRequest", "session_id"), BAD)),
    "get_session_session_id": ("GetSession", length_delimited(field("GetSessionRequest", "session_id"), BAD)),
    "score_text": ("Score", length_delimited(field("ScoreRequest", "text"), BAD)),
    "generate_truncated": ("Generate", valid[:-3]),
    "score_truncated": ("Score", length_delimited(field("ScoreRequest", "text"), b"def f(x):")[:-4]),
    "generate_random": ("Generate", noise),
    "generate_unary_random": ("GenerateUnary", noise),
    "get_session_random": ("GetSession", noise),
    "model_info_random": ("ModelInfo", noise),
}
out["undecodable"] = {name: status(method, payload) for name, (method, payload) in cases.items()}

# Long session ids: refused with a short message on every RPC that takes one.
for size in (10_000, 100_000):
    sid = "x" * size
    reqs = {
        "Generate": GenerateRequest(text="def f(x):", session_id=sid).SerializeToString(),
        "Resume": message("ResumeRequest")(session_id=sid).SerializeToString(),
        "Cancel": message("CancelRequest")(session_id=sid).SerializeToString(),
        "GetSession": message("GetSessionRequest")(session_id=sid).SerializeToString(),
    }
    out[f"session_id_{size}"] = {m: status(m, p) for m, p in reqs.items()}

# A message over the server's size limit.
out["five_megabytes"] = status("GenerateUnary", GenerateRequest(text="a" * (5 << 20)).SerializeToString())

# Deadlines that pass while the call runs.
slow = GenerateRequest(token_ids={"ids": [1, 2, 3]}, parameters={"max_new_tokens": 200, "ignore_eos": True}).SerializeToString()
deadlines = {}
for timeout in (0.001, 0.05):
    for _ in range(30):
        code, _ = call("GenerateUnary", slow, timeout=timeout)
        deadlines[code] = deadlines.get(code, 0) + 1
out["deadlines"] = deadlines

# One call with a 64 KiB header on the channel of a running stream: that call
# fails, the stream finishes.
stream_request = GenerateRequest(token_ids={"ids": [5, 6, 7]}, parameters={"max_new_tokens": 1000, "ignore_eos": True}).SerializeToString()
GenerateResponse = message("GenerateResponse")
generate = channel.unary_stream("/blockserve.v1.Generation/Generate", request_serializer=lambda b: b, response_deserializer=GenerateResponse.FromString)
result = {}
running = threading.Event()
tokens = []


def run_stream():
    try:
        for r in generate(stream_request):
            tokens.extend(r.tokens.token_ids)
            if tokens:
                running.set()
        result["stream"] = ["OK", len(tokens)]
    except grpc.RpcError as e:
        result["stream"] = [e.code().name, e.details()]
    running.set()


runner = threading.Thread(target=run_stream)
runner.start()
running.wait()
result["big_header"] = status("ModelInfo", b"", metadata=[("x-padding", "p" * 65536)])
result["tokens_when_refused"] = len(tokens)
runner.join()
result["after"] = status("ModelInfo", b"")
out["big_header"] = result

print(json.dumps(out))
