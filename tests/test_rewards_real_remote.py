"""The GenEval and UnifiedReward HTTP clients against a local ``http.server`` stub speaking
Flow-GRPO's reward-server protocol (pickled dict in, pickled dict out, HTTP 500 + traceback)."""
from __future__ import annotations

import io
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from opd.rewards.remote import GenEvalRemote, RemoteRewardError, UnifiedRewardRemote, parse_score

META = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}


class Stub:
    """A reward server in a thread; ``handle(payload) -> (status, body)`` decides each answer."""

    def __init__(self, handle):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(payload)
                status, body = handle(payload)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except BrokenPipeError:  # the client gave up (the timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_factory():
    stubs = []

    def make(handle):
        stubs.append(Stub(handle))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.close()


def decoded_means(payload) -> list[float]:
    """Mean intensity of each JPEG the client sent, as the server sees it."""
    return [float(np.asarray(Image.open(io.BytesIO(b), formats=["jpeg"])).mean() / 255) for b in payload["images"]]


def geneval_server(payload):
    means = decoded_means(payload)
    n = len(means)
    assert all("prompt" in meta and "tag" in meta for meta in payload["meta_datas"])
    reply = {"scores": means, "rewards": [0.0] * n if payload["only_strict"] else [1.0] * n,
             "strict_rewards": [float(m > 0.5) for m in means], "group_rewards": {}, "group_strict_rewards": {}}
    return 200, pickle.dumps(reply)


def flat_images(levels):
    return torch.stack([torch.full((3, 32, 32), level) for level in levels])


def test_geneval_sends_jpegs_and_metadata_and_reads_the_scores(stub_factory):
    stub = stub_factory(geneval_server)
    levels = [0.1, 0.3, 0.6, 0.8, 0.95]
    reward = GenEvalRemote(url=stub.url, batch_size=2)
    out = reward.score(flat_images(levels), [f"a photo of a cat {i}" for i in range(5)], [META] * 5)
    assert len(stub.requests) == 3  # batches of 2, 2, 1
    assert stub.requests[0]["only_strict"] is True
    assert stub.requests[0]["meta_datas"][1]["prompt"] == "a photo of a cat 1"
    torch.testing.assert_close(out["reward"], torch.tensor(levels), atol=0.01, rtol=0)  # JPEG round trip
    assert out["strict_correct"].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert "correct" not in out  # not computed by the server when only_strict
    full = GenEvalRemote(url=stub.url, only_strict=False).score(flat_images(levels[:2]), ["x", "y"], [META] * 2)
    assert full["correct"].tolist() == [1.0, 1.0]


def test_geneval_needs_geneval_metadata(stub_factory):
    stub = stub_factory(geneval_server)
    with pytest.raises(ValueError, match="metadata\\[0\\] lacks GenEval's 'tag'"):
        GenEvalRemote(url=stub.url).score(flat_images([0.5]), ["a cat"], [{}])


def test_server_error_is_retried_then_reported_with_its_traceback(stub_factory):
    stub = stub_factory(lambda payload: (500, b"Traceback (most recent call last):\nKeyError: 'tag'"))
    reward = GenEvalRemote(url=stub.url, max_retries=1, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match="(?s)HTTP 500.*KeyError: 'tag'"):
        reward.score(flat_images([0.5]), ["a cat"], [META])
    assert len(stub.requests) == 2


def test_malformed_answer_is_a_protocol_error(stub_factory):
    stub = stub_factory(lambda payload: (200, pickle.dumps({"scores": [1.0, 2.0]})))
    with pytest.raises(RemoteRewardError, match="lacks 'strict_rewards'|returned 2 'scores' for 1 images"):
        GenEvalRemote(url=stub.url).score(flat_images([0.5]), ["a cat"], [META])


def test_unreachable_server_is_a_connection_error_naming_the_url():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=f"cannot reach the reward server at {url}"):
        UnifiedRewardRemote(url=url, backoff_s=0.01).score(flat_images([0.5]), ["a cat"], [{}])


def test_slow_server_times_out(stub_factory):
    def slow(payload):
        time.sleep(1.0)
        return 200, pickle.dumps({"outputs": [3.0]})

    stub = stub_factory(slow)
    with pytest.raises(TimeoutError, match="no complete answer .* within 0.2 s"):
        UnifiedRewardRemote(url=stub.url, timeout=0.2, max_retries=0).score(flat_images([0.5]), ["a cat"], [{}])


def test_unifiedreward_scores_divide_by_five(stub_factory):
    answers = [4.0, "The image matches.\nFinal Score: 3.5", "no score here"]
    stub = stub_factory(lambda payload: (200, pickle.dumps({"outputs": answers[: len(payload["prompts"])]})))
    prompts = ["a cat", "a dog", "a bird"]
    with pytest.warns(RuntimeWarning, match="no score"):
        out = UnifiedRewardRemote(url=stub.url).score(flat_images([0.2, 0.5, 0.7]), prompts, [{}] * 3)
    assert stub.requests[0]["prompts"] == prompts and len(stub.requests[0]["images"]) == 3
    assert out["raw"].tolist() == [4.0, 3.5, 0.0]
    torch.testing.assert_close(out["reward"], torch.tensor([0.8, 0.7, 0.0]))


def test_parse_score():
    assert parse_score(2) == 2.0
    assert parse_score("blah Final Score: 5") == 5.0
    assert parse_score("Final Score: 7") is None  # outside UnifiedReward's 1–5 range
    assert parse_score(np.float32(3.5)) == 3.5  # a numpy number is no str to search
