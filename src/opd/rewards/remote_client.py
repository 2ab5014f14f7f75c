"""The HTTP(S) client of the reward servers (Flow-GRPO's ``reward-server`` protocol): one POST
of a pickled dict per batch, a dict back.

Safety (docs/reliability.md lists every case with its test):

- **Replies cannot run code.** A pickled answer is read by :class:`SafeUnpickler`, which loads
  only plain containers, numbers, strings, bytes and numpy arrays/scalars (the reference servers
  answer Python lists/dicts of floats and strings); any other global (``os.system``,
  ``builtins.eval``, a class, …) is refused with a :class:`RemoteRewardError` naming it, before
  anything is called. An answer with ``Content-Type: application/json`` is read as JSON instead
  (the request asks for it with ``Accept``; the reference servers answer pickles).
- **One deadline per request.** ``timeout`` bounds the whole request — connect, TLS handshake,
  sending the batch, reading the status line, headers and body — however slowly the server
  trickles bytes (a watchdog shuts the socket at the deadline). Only the host name lookup is
  outside it. Answers over ``max_reply_bytes`` are refused.
- **Retries.** Timeouts, connection errors and HTTP 5xx are tried again, up to ``max_retries``
  more times, ``backoff_s``, 2·``backoff_s``, 4·``backoff_s``, … apart; HTTP 3xx/4xx,
  certificate failures and malformed or refused answers are not (trying again cannot help). The
  final error names the url, the number of attempts and the last error; it is a
  :class:`RemoteRewardError` and, after timeouts / connection errors, also a ``TimeoutError`` /
  ``ConnectionError``.
- **https.** ``https://`` urls are verified against the system's CAs, or ``ca_bundle`` (a PEM
  file or folder); ``verify=False`` turns verification off (warned once). A plain ``http://`` url
  to a host other than loopback is warned about once per url: the images and the answers travel
  unencrypted and unauthenticated.
- The request stays a pickle (the reference servers read nothing else), so a server must trust
  whoever can reach its port: bind it to 127.0.0.1 or a private network.
"""
from __future__ import annotations

import collections
import http.client
import importlib
import io
import ipaddress
import json
import os
import pickle
import re
import socket
import ssl
import threading
import time
import urllib.parse
import warnings
from typing import Any


class RemoteRewardError(RuntimeError):
    """The reward server answered with an error or a malformed / refused reply, or could not be
    used after all retries."""


class RemoteRewardTimeout(RemoteRewardError, TimeoutError):
    """Every attempt ended at the deadline (the last one by a timeout)."""


class RemoteRewardUnreachable(RemoteRewardError, ConnectionError):
    """The last attempt could not connect, or the connection broke."""


class InsecureRewardServerWarning(UserWarning):
    """The reward server is reached without encryption or without certificate verification."""


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickled reply asked for a global outside :class:`SafeUnpickler`'s allowlist."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


#: the largest answer read (the reference answers are a few kB per batch)
MAX_REPLY_BYTES = 64 * 1024 * 1024


def _bytes_or_bytearray(kind: type) -> Any:
    """``bytes`` / ``bytearray`` as pickles call them (no argument, bytes, or latin1 text), never
    with a size (``bytearray(10**11)`` would allocate it)."""

    def make(*args: Any) -> Any:
        if args == () or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
            return kind(*args)
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            return kind(args[0], args[1])
        raise pickle.UnpicklingError(f"{kind.__name__} is allowed only from bytes or latin1 text")

    return make


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``, and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as latin1 text → bytes, "
                                     f"not with {encoding!r}")
    return text.encode("latin1")


class _NdarrayType:
    """What ``numpy.ndarray`` loads as: usable only as ``_reconstruct``'s first argument (how numpy
    pickles arrays); calling it (``ndarray(shape, dtype, buffer, offset, strides)``) is refused."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("calling numpy.ndarray directly is not allowed")


_NDARRAY = _NdarrayType()


def _numpy_module(name: str) -> Any:
    """``numpy._core.<name>`` (numpy 2), else ``numpy.core.<name>`` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's ``_reconstruct`` limited to what ``ndarray.__reduce__`` writes: a plain ndarray of
    shape ``(0,)`` (``__setstate__`` then fills in the shape and the data, which numpy checks)."""
    import numpy as np

    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct is allowed only for a plain ndarray of shape (0,)")
    return _numpy_module("multiarray")._reconstruct(np.ndarray, (0,), dtype)


def _safe_global(module: str, name: str) -> Any:
    """The object a safe pickle may name, or ``None``."""
    if module == "__builtin__":  # protocol 0–2 pickles name Python 2's module
        module = "builtins"
    if module == "builtins" and name in ("set", "frozenset", "complex"):
        return {"set": set, "frozenset": frozenset, "complex": complex}[name]
    if module == "builtins" and name in ("bytes", "bytearray"):
        return _bytes_or_bytearray(bytes if name == "bytes" else bytearray)
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if (module, name) == ("_codecs", "encode"):
        return _latin1_encode
    if module == "numpy" and name in ("ndarray", "dtype"):
        import numpy as np

        return _NDARRAY if name == "ndarray" else np.dtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return _numpy_reconstruct if name == "_reconstruct" else _numpy_module("multiarray").scalar
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return _numpy_module("numeric")._frombuffer  # protocol 5: frombuffer(data).reshape(...)
    return None


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for reward-server answers that cannot run code: ``find_class`` (the only way a
    pickle reaches callables: GLOBAL, STACK_GLOBAL, INST, OBJ, the copyreg extensions) resolves
    only plain containers (``set``, ``frozenset``, ``complex``, ``collections.OrderedDict``,
    ``bytes``/``bytearray`` from data, not from a size), protocol 2's latin1 ``_codecs.encode`` and
    the numpy globals that
    numpy's own array/scalar pickles use (``numpy.dtype``, ``numpy.ndarray`` as a type only,
    ``_reconstruct`` for shape ``(0,)``, ``scalar``, ``_frombuffer``); anything else raises
    :class:`ForbiddenGlobalError`. Persistent ids are refused (the base class has no loader)."""

    def find_class(self, module: str, name: str) -> Any:
        found = _safe_global(module, name)
        if found is None:
            raise ForbiddenGlobalError(module, name)
        return found


def safe_loads(body: bytes) -> Any:
    """``pickle.loads`` through :class:`SafeUnpickler`."""
    return SafeUnpickler(io.BytesIO(body)).load()


# --- the HTTP(S) client -------------------------------------------------------------------------

_WARNED: set[tuple[str, str]] = set()


def _warn_once(kind: str, url: str, message: str) -> None:
    if (kind, url) not in _WARNED:
        _WARNED.add((kind, url))
        warnings.warn(message, InsecureRewardServerWarning, stacklevel=4)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ssl_context(verify: bool = True, ca_bundle: str | None = None) -> ssl.SSLContext:
    """The TLS settings of ``https://`` urls: the system's CAs (or ``ca_bundle``, a PEM file or a
    folder of them) with host name checks, or, when not ``verify``, no checks at all."""
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_bundle is None:
        return ssl.create_default_context()
    path = os.path.expanduser(str(ca_bundle))
    if not os.path.exists(path):
        raise ValueError(f"ca_bundle {ca_bundle!r} does not exist (a PEM file of CA certificates, or a folder)")
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


class _Transient(Exception):
    """An attempt that may succeed when tried again: ``kind`` is timeout, connection or http."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class RewardServerClient:
    """``POST`` a pickled dict to ``url``; read the answer safely (module docstring).

    Args:
        url: the server, ``http://host:port[/path]`` or ``https://…``.
        what: the reward's name for error messages.
        timeout: seconds for one whole request (connect + send + the whole answer).
        max_retries: extra attempts after a timeout, a connection error or HTTP 5xx.
        backoff_s: wait before the first retry; doubled before each further one.
        verify: check the server's TLS certificate (``https://``).
        ca_bundle: CA certificates (PEM file or folder) to check it against instead of the system's.
        max_reply_bytes: larger answers are refused.
    """

    def __init__(self, url: str, what: str, timeout: float = 120.0, max_retries: int = 2,
                 backoff_s: float = 1.0, verify: bool = True, ca_bundle: str | None = None,
                 max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        parts = urllib.parse.urlsplit(str(url))
        scheme = parts.scheme.lower()
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (scheme not in ("http", "https") or not parts.hostname or port == -1
                or re.search(r"[\x00-\x20\x7f]", str(url))):
            raise ValueError(f"{what}: the reward server url {url!r} is not http(s)://host[:port][/path]")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"{what}: credentials in the reward server url are not supported ({parts.hostname})")
        if timeout <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(f"{what}: needs timeout > 0, max_retries >= 0, backoff_s >= 0 "
                             f"(got {timeout}, {max_retries}, {backoff_s})")
        self.url, self.what = str(url), what
        self.scheme, self.host, self.port = scheme, parts.hostname, port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout, self.max_retries, self.backoff_s = float(timeout), int(max_retries), float(backoff_s)
        self.max_reply_bytes = max_reply_bytes
        self.ssl_context = ssl_context(verify, ca_bundle) if scheme == "https" else None
        if scheme == "http" and not is_loopback(self.host):
            _warn_once("http", self.url, f"{what}: the reward server {self.url} is plain http to another "
                                         "machine: images and answers travel unencrypted and unauthenticated; "
                                         "prefer https:// (with `ca_bundle`) or an SSH tunnel to 127.0.0.1")
        if scheme == "https" and not verify:
            _warn_once("verify", self.url, f"{what}: TLS certificate verification is off for {self.url} "
                                           "(verify=false); anyone on the path can impersonate the server")

    def post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send ``payload``, return the answer's dict; retries as the module docstring says."""
        data = pickle.dumps(payload)
        attempts = self.max_retries + 1
        last: _Transient | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2.0 ** (attempt - 1))
            try:
                status, content_type, body = self._attempt(data)
            except _Transient as err:
                last = err
                continue
            if 200 <= status < 300:
                return self._decode(body, content_type)
            detail = body.decode("utf-8", "replace").strip()[-2000:] or http.client.responses.get(status, "")
            if status >= 500:
                last = _Transient("http", f"HTTP {status} from {self.url}: {detail}")
                continue
            raise RemoteRewardError(f"{self.what}: the server at {self.url} answered HTTP {status} (not "
                                    f"retried: a request or address error): {detail}")
        assert last is not None
        message = (f"{self.what}: gave up on the reward server at {self.url} after {attempts} attempt"
                   f"{'s' if attempts > 1 else ''} (max_retries={self.max_retries}); last error: {last}")
        if last.kind == "timeout":
            raise RemoteRewardTimeout(f"{message}. Is the server overloaded? Raise the reward's `timeout` "
                                      "or lower its `batch_size`.")
        if last.kind == "connection":
            raise RemoteRewardUnreachable(f"{message}. Start it (Flow-GRPO's reward-server) or point the "
                                          "reward's `url` at a running one.")
        raise RemoteRewardError(message)

    def _connection(self) -> http.client.HTTPConnection:
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _attempt(self, data: bytes) -> tuple[int, str, bytes]:
        """One request within ``timeout``: ``(status, content type, body)``, or :class:`_Transient`."""
        conn = self._connection()
        response: http.client.HTTPResponse | None = None
        cut = threading.Event()
        # The watchdog shuts the socket at the deadline, which wakes whatever connect, TLS handshake,
        # send or read is blocked on it: ``conn.sock`` while connecting (the plain socket during the
        # handshake), ``sockets`` afterwards (http.client drops ``conn.sock`` once the response takes
        # the connection over).
        sockets: list[socket.socket] = []

        def at_deadline() -> None:
            cut.set()
            for sock in (conn.sock, *sockets):
                if sock is not None:
                    try:
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
                    except OSError:
                        pass

        watchdog = threading.Timer(self.timeout, at_deadline)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            sockets.append(conn.sock)
            if cut.is_set():  # the deadline passed while connecting, before there was a socket to cut
                raise TimeoutError
            conn.request("POST", self.path, body=data, headers={
                "Content-Type": "application/octet-stream", "Accept": "application/json, */*;q=0.5"})
            response = conn.getresponse()
            body = self._read(response)
            if cut.is_set():  # a cut answer can look complete (no Content-Length)
                raise TimeoutError
            return response.status, response.getheader("Content-Type", "") or "", body
        except ssl.SSLCertVerificationError as err:
            raise RemoteRewardError(f"{self.what}: the TLS certificate of {self.url} does not verify "
                                    f"({err.verify_message}); not retried. Point `ca_bundle` at the CA "
                                    "that signed it (or, only on a trusted network, set verify=false)") from None
        except (OSError, http.client.HTTPException) as err:
            if cut.is_set() or isinstance(err, TimeoutError):
                raise _Transient("timeout", f"no complete answer from {self.url} within {self.timeout:g} s "
                                            "(connect + send + reply)") from None
            reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            if isinstance(err, http.client.HTTPException) and not isinstance(
                    err, (http.client.IncompleteRead, http.client.RemoteDisconnected)):
                raise RemoteRewardError(f"{self.what}: {self.url} did not answer in HTTP ({reason}); not "
                                        "retried. Is the url the reward server's?") from None
            raise _Transient("connection", f"cannot reach the reward server at {self.url} ({reason})") from None
        finally:
            watchdog.cancel()
            if response is not None:
                response.close()
            conn.close()

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_reply_bytes:
            raise RemoteRewardError(f"{self.what}: {self.url} announced a {int(length)}-byte answer, over "
                                    f"max_reply_bytes={self.max_reply_bytes}; refused")
        chunks, size = [], 0
        while chunk := response.read(65536):
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise RemoteRewardError(f"{self.what}: the answer of {self.url} is over "
                                        f"max_reply_bytes={self.max_reply_bytes}; refused")
            chunks.append(chunk)
        if response.length:  # read(amt) returns short at EOF instead of raising (http.client's choice)
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        return b"".join(chunks)

    def _decode(self, body: bytes, content_type: str) -> dict[str, Any]:
        mime = content_type.split(";")[0].strip().lower()
        if mime == "application/json" or mime.endswith("+json"):
            try:
                reply = json.loads(body.decode("utf-8"))
            except ValueError as err:  # also UnicodeDecodeError
                raise RemoteRewardError(f"{self.what}: the JSON answer of {self.url} does not parse ({err}); "
                                        f"first bytes: {body[:80]!r}") from None
        else:
            try:
                reply = safe_loads(body)
            except ForbiddenGlobalError as err:
                raise RemoteRewardError(
                    f"{self.what}: refused the answer of {self.url}: it asks to load the Python global "
                    f"`{err.module}.{err.name}`, which a reward answer never needs and which could run code "
                    "on this machine (only plain containers, numbers, strings, bytes and numpy arrays are "
                    "accepted). Is this really the reward server?") from None
            except Exception as err:  # noqa: BLE001 — any undecodable body is the same protocol error
                raise RemoteRewardError(f"{self.what}: the answer of {self.url} is not a pickled dict "
                                        f"({err!r}); first bytes: {body[:80]!r}") from None
        if not isinstance(reply, dict):
            raise RemoteRewardError(f"{self.what}: {self.url} answered a {type(reply).__name__}, not a dict")
        return reply
