"""The reward-server client against hostile or failing servers, all on 127.0.0.1: answers that try
to run code, a server trickling bytes, timeouts, 5xx / 4xx, oversized answers, JSON answers, TLS
and the url checks (docs/reliability.md)."""
from __future__ import annotations

import builtins
import collections
import json
import math
import os
import pickle
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from opd.rewards.remote import (
    GenEvalRemote,
    InsecureRewardServerWarning,
    RemoteRewardError,
    RemoteRewardTimeout,
    RewardServerClient,
    UnifiedRewardRemote,
    safe_loads,
)

META = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}


def images(n: int = 1):
    return torch.full((n, 3, 16, 16), 0.5)


class Server:
    """An HTTP(S) server in a thread; ``respond(handler, server)`` writes each answer (``send``
    below, or raw bytes). ``requests`` holds ``(path, payload)``; ``stop`` ends waiting handlers."""

    def __init__(self, respond, tls: ssl.SSLContext | None = None):
        self.requests: list[tuple[str, dict]] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append((self.path, pickle.loads(body)))  # the client's own request
                try:
                    respond(self, server)
                except OSError:  # the client gave up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, status: int, body: bytes, content_type: str = "text/html; charset=utf-8"):
    """As Flask answers ``return bytes, status`` (text/html, whatever the bytes are)."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def serve():
    servers = []

    def make(respond, tls=None):
        servers.append(Server(respond, tls))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def outputs_reply(handler, server, value=3.0):
    send(handler, 200, pickle.dumps({"outputs": [value] * len(server.requests[-1][1]["prompts"])}))


# --- answers that try to run code ---------------------------------------------------------------

class RunsShell:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class RunsEval:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.path)!r}, 'w').write('pwned')",)


class CopiesFile:
    def __init__(self, source, path):
        self.source, self.path = source, path

    def __reduce__(self):
        return shutil.copyfile, (str(self.source), str(self.path))


@pytest.mark.parametrize("attack, forbidden", [
    ("shell", r"`(posix|os|nt)\.system`"),
    ("eval", r"`builtins\.eval`"),
    ("module_function", r"`shutil\.copyfile`"),
    ("hidden_in_a_valid_reply", r"`(posix|os|nt)\.system`"),
])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(serve, tmp_path, attack, forbidden):
    target = tmp_path / "pwned"
    source = tmp_path / "source"
    source.write_text("x")
    reply = {"shell": RunsShell(target), "eval": RunsEval(target), "module_function": CopiesFile(source, target),
             "hidden_in_a_valid_reply": {"outputs": [3.0, RunsShell(target)]}}[attack]
    body = pickle.dumps(reply)
    server = serve(lambda handler, server: send(handler, 200, body))
    with pytest.raises(RemoteRewardError, match=f"refused the answer of {server.url}: .*{forbidden}.*could run code"):
        UnifiedRewardRemote(url=server.url, backoff_s=0.01).score(images(), ["a cat"], [{}])
    assert not target.exists()  # nothing ran
    assert len(server.requests) == 1  # a refused answer is not asked for again


class CallsNdarray:
    def __reduce__(self):
        return np.ndarray, ((10**12,), np.dtype("u1"))


def test_numpy_is_allowed_only_as_numpy_pickles_it():
    with pytest.raises(pickle.UnpicklingError, match="calling numpy.ndarray directly"):
        safe_loads(pickle.dumps(CallsNdarray()))
    with pytest.raises(pickle.UnpicklingError, match=r"numpy\.lib\.npyio\.load|numpy\.load"):
        safe_loads(pickle.dumps(np.load))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_and_numpy_answers_load(protocol):
    reply = {"scores": [0.5, 1, True, None, float("nan")], "text": "Final Score: 3", "raw": b"\x00\xff",
             "sets": ({1, 2}, frozenset({"a"})), "buffer": bytearray(b"ab"), "z": 1 + 2j,
             "ordered": collections.OrderedDict(a=1), "np_scalars": [np.float32(0.25), np.int64(3), np.bool_(True)],
             "arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), np.asfortranarray(np.ones((2, 2))),
                        np.array(["x", "yz"]), np.array([1, "a"], dtype=object), np.zeros(0)]}
    loaded = safe_loads(pickle.dumps(reply, protocol=protocol))
    assert loaded["scores"][:4] == [0.5, 1, True, None] and math.isnan(loaded["scores"][4])
    for key in ("text", "raw", "sets", "buffer", "z", "ordered", "np_scalars"):
        assert loaded[key] == reply[key] and type(loaded[key]) is type(reply[key])
    for got, want in zip(loaded["arrays"], reply["arrays"]):
        assert type(got) is np.ndarray and got.dtype == want.dtype and np.array_equal(got, want)


def test_numpy_scores_reach_the_rewards(serve):
    def respond(handler, server):
        payload = server.requests[-1][1]
        n = len(payload["images"])
        if "prompts" in payload:
            send(handler, 200, pickle.dumps({"outputs": [np.float32(3.5)] * n}))
        else:
            send(handler, 200, pickle.dumps({"scores": np.full(n, 0.75), "rewards": np.zeros(n),
                                             "strict_rewards": [np.float64(1.0)] * n, "group_rewards": {},
                                             "group_strict_rewards": {}}, protocol=5))

    server = serve(respond)
    assert UnifiedRewardRemote(url=server.url).score(images(2), ["a", "b"], [{}] * 2)["raw"].tolist() == [3.5, 3.5]
    out = GenEvalRemote(url=server.url).score(images(2), ["a", "b"], [META] * 2)
    assert out["reward"].tolist() == [0.75, 0.75] and out["strict_correct"].tolist() == [1.0, 1.0]


def test_json_answers(serve):
    replies = [json.dumps({"outputs": [4.0, "Final Score: 2"]}).encode(), b"{not json"]
    server = serve(lambda handler, server: send(handler, 200, replies[len(server.requests) - 1],
                                                "application/json; charset=utf-8"))
    out = UnifiedRewardRemote(url=server.url).score(images(2), ["a", "b"], [{}] * 2)
    assert out["raw"].tolist() == [4.0, 2.0]
    with pytest.raises(RemoteRewardError, match="JSON answer of .* does not parse"):
        UnifiedRewardRemote(url=server.url, backoff_s=0.01).score(images(2), ["a", "b"], [{}] * 2)
    assert len(server.requests) == 2  # the malformed one was not retried


# --- one deadline per request -------------------------------------------------------------------

def trickle(head: bytes, rest: bytes):
    """A server sending ``head`` at once, then ``rest`` one byte every 0.2 s (at most 50 bytes)."""

    def respond(handler, server):
        handler.wfile.write(head)
        for byte in rest[:50]:
            if server.stop.wait(0.2):
                return
            handler.wfile.write(bytes([byte]))

    return respond


@pytest.mark.parametrize("where", ["status_line", "body"])
def test_a_trickling_server_is_cut_at_the_deadline(serve, where):
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n"
    respond = trickle(b"", answer) if where == "status_line" else trickle(answer, b"x" * 1000)
    server = serve(respond)
    reward = UnifiedRewardRemote(url=server.url, timeout=1.5, max_retries=0)
    start = time.monotonic()
    with pytest.raises(RemoteRewardTimeout, match="after 1 attempt .* within 1.5 s"):
        reward.score(images(), ["a cat"], [{}])
    assert time.monotonic() - start <= 1.5 + 0.5


# --- retries ------------------------------------------------------------------------------------

def test_two_server_errors_then_an_answer_succeeds(serve):
    def respond(handler, server):
        if len(server.requests) <= 2:
            send(handler, 500, b"Traceback (most recent call last):\nRuntimeError: CUDA out of memory")
        else:
            outputs_reply(handler, server)

    server = serve(respond)
    start = time.monotonic()
    out = UnifiedRewardRemote(url=server.url, max_retries=2, backoff_s=0.05).score(images(), ["a cat"], [{}])
    assert out["raw"].tolist() == [3.0] and len(server.requests) == 3
    assert time.monotonic() - start >= 0.05 + 0.1  # backoff 0.05 s, then 0.1 s


def test_a_server_that_never_answers_fails_after_all_attempts_in_time(serve):
    server = serve(lambda handler, server: server.stop.wait(5))
    reward = UnifiedRewardRemote(url=server.url, timeout=0.3, max_retries=2, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RemoteRewardTimeout) as info:
        reward.score(images(), ["a cat"], [{}])
    elapsed = time.monotonic() - start
    expected = 3 * 0.3 + 0.05 + 0.1
    assert expected - 0.05 <= elapsed <= expected + 0.6
    assert len(server.requests) == 3
    message = str(info.value)
    assert server.url in message and "after 3 attempts (max_retries=2)" in message and "within 0.3 s" in message
    assert isinstance(info.value, TimeoutError)  # callers catching TimeoutError still do


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=f"{url} after 3 attempts .*cannot reach the reward server") as info:
        UnifiedRewardRemote(url=url, backoff_s=0.01).score(images(), ["a cat"], [{}])
    assert isinstance(info.value, RemoteRewardError)


@pytest.mark.parametrize("status, body, match", [
    (404, b"Not Found", "HTTP 404 .*not retried.*Not Found"),
    (200, b"<html>not a pickle</html>", "is not a pickled dict"),
    (200, pickle.dumps([1.0]), "answered a list, not a dict"),
])
def test_client_errors_and_malformed_answers_are_not_retried(serve, status, body, match):
    server = serve(lambda handler, server: send(handler, status, body))
    with pytest.raises(RemoteRewardError, match=match):
        UnifiedRewardRemote(url=server.url, backoff_s=0.01).score(images(), ["a cat"], [{}])
    assert len(server.requests) == 1


def test_a_server_not_speaking_http_is_not_retried(serve):
    server = serve(lambda handler, server: handler.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    with pytest.raises(RemoteRewardError, match="did not answer in HTTP .*BadStatusLine"):
        UnifiedRewardRemote(url=server.url, backoff_s=0.01).score(images(), ["a cat"], [{}])
    assert len(server.requests) == 1


def test_a_connection_dropped_mid_answer_is_retried(serve):
    def respond(handler, server):
        if len(server.requests) == 1:  # promises 1000 bytes, sends 5, hangs up
            handler.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\nabcde")
        else:
            outputs_reply(handler, server)

    server = serve(respond)
    assert UnifiedRewardRemote(url=server.url, backoff_s=0.01).score(images(), ["a"], [{}])["raw"].tolist() == [3.0]
    assert len(server.requests) == 2


def test_oversized_answers_are_refused(serve):
    server = serve(lambda handler, server: send(handler, 200, pickle.dumps({"outputs": ["x" * 5000]})))
    client = RewardServerClient(server.url, "test", max_reply_bytes=1000)
    with pytest.raises(RemoteRewardError, match="over max_reply_bytes=1000"):
        client.post({"prompts": ["a"]})
    assert len(server.requests) == 1


# --- urls, http and https -----------------------------------------------------------------------

def test_the_url_path_and_query_are_posted_to(serve):
    server = serve(outputs_reply)
    UnifiedRewardRemote(url=server.url + "/score?model=7b").score(images(), ["a cat"], [{}])
    assert server.requests[0][0] == "/score?model=7b"


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "127.0.0.1:18085", "http://", "http://127.0.0.1:99999",
                                 "http://user:secret@127.0.0.1:1", "http://127.0.0.1:1/a b"])
def test_bad_urls_are_refused_at_construction(url):
    with pytest.raises(ValueError, match="url"):
        GenEvalRemote(url=url)


def test_plain_http_to_another_machine_is_warned_about_once():
    url = f"http://192.0.2.7:18085/{uuid.uuid4().hex}"  # TEST-NET-1: never contacted, only parsed
    with pytest.warns(InsecureRewardServerWarning, match="plain http to another machine"):
        GenEvalRemote(url=url)
    for again in (url, "http://127.0.0.1:18085", "http://localhost:1", "http://[::1]:1"):
        with warnings_recorded() as seen:
            GenEvalRemote(url=again)
        assert not [w for w in seen if issubclass(w.category, InsecureRewardServerWarning)], again


def warnings_recorded():
    import warnings

    class Recorder(warnings.catch_warnings):
        def __enter__(self):
            seen = super().__enter__()
            warnings.simplefilter("always")
            return seen

    return Recorder(record=True)


def test_https_urls_build_a_verifying_tls_context_without_connecting(tmp_path):
    client = GenEvalRemote(url="https://reward.example:8443/geneval").client
    assert client.scheme == "https" and client.port == 8443 and client.path == "/geneval"
    assert client.ssl_context.verify_mode == ssl.CERT_REQUIRED and client.ssl_context.check_hostname
    assert type(client._connection()).__name__ == "HTTPSConnection"  # built, not connected
    assert GenEvalRemote(url="http://127.0.0.1:1").client.ssl_context is None
    url = f"https://reward.example:8443/{uuid.uuid4().hex}"
    with pytest.warns(InsecureRewardServerWarning, match="verification is off"):
        unverified = GenEvalRemote(url=url, verify=False).client
    assert unverified.ssl_context.verify_mode == ssl.CERT_NONE and not unverified.ssl_context.check_hostname
    with pytest.raises(ValueError, match="ca_bundle .* does not exist"):
        GenEvalRemote(url="https://reward.example:8443", ca_bundle=str(tmp_path / "missing.pem"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_on_loopback_with_a_ca_bundle(serve, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = serve(outputs_reply, tls=tls)
    out = UnifiedRewardRemote(url=server.url, ca_bundle=str(cert)).score(images(), ["a cat"], [{}])
    assert out["raw"].tolist() == [3.0]
    with pytest.raises(RemoteRewardError, match="certificate of .* does not verify .*not retried.*ca_bundle"):
        UnifiedRewardRemote(url=server.url, backoff_s=0.01).score(images(), ["a cat"], [{}])
    assert len(server.requests) == 1
