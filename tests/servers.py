"""Real servers for tests: redis-server and the moto S3 server, each on a free loopback port.

They run as child processes (not in the pytest process) so that Celery worker
subprocesses can reach them and fault-injection tests can stop and restart them.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f}s")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class ServerProcess:
    """A child process with a log file; stop() is safe to call twice."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_up(self) -> bool:
        raise NotImplementedError

    env: dict[str, str] = {}

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                start_new_session=True, env=os.environ | self.env,
            )
        try:
            wait_until(self.is_up, 30, self.name)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.name} failed to start:\n{log_tail(self.log_path)}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisServer(ServerProcess):
    """redis-server; options for the fault and security tests:

    appendonly: persist every write (AOF, fsync always) so that a restart keeps the queues;
    password: require it (`--requirepass`); tls_dir: serve TLS only, with a self-signed
    certificate made there (the URL names it as the CA to trust).
    """

    name = "redis-server"

    def __init__(self, workdir: Path, *, appendonly: bool = False, password: str | None = None,
                 tls: bool = False) -> None:
        super().__init__(workdir)
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        if tls:
            self._make_certificate()

    @property
    def ca_path(self) -> Path:
        return self.workdir / "tls-cert.pem"

    def _make_certificate(self) -> None:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(self.workdir / "tls-key.pem"), "-out", str(self.ca_path),
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return (f"rediss://{auth}127.0.0.1:{self.port}/0"
                    f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca_path}")
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run `make test` (it installs it)")
        command = [binary, "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir)]
        if self.appendonly:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls:
            command += ["--port", "0", "--tls-port", str(self.port),
                        "--tls-cert-file", str(self.ca_path),
                        "--tls-key-file", str(self.workdir / "tls-key.pem"),
                        "--tls-ca-cert-file", str(self.ca_path), "--tls-auth-clients", "no"]
        else:
            command += ["--port", str(self.port)]
        return command

    def is_up(self) -> bool:
        auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
        expected = b"+OK\r\n+PONG" if self.password else b"+PONG"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                sock = raw
                if self.tls:
                    context = ssl.create_default_context(cafile=str(self.ca_path))
                    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(auth + b"PING\r\n")
                reply = b""
                while len(reply) < len(expected):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    reply += chunk
                return reply.startswith(expected)
        except OSError:
            return False


class MotoS3Server(ServerProcess):
    """The moto S3 server; env: extra variables for it (e.g. INITIAL_NO_AUTH_ACTION_COUNT,
    after which moto checks credentials and IAM policies like AWS)."""

    name = "moto_server"
    bucket = "batchinfer-test"

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(workdir)
        self.env = env or {}

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = Path(sys.executable).with_name("moto_server")
        return [str(binary), "-H", "127.0.0.1", "-p", str(self.port)]

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=0.5):
                return True
        except OSError:
            return False

    def start(self) -> None:
        super().start()
        # moto keeps state in memory: a (re)started server needs its bucket again.
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url).create_bucket(Bucket=self.bucket)


class TcpProxy:
    """A TCP proxy on a free loopback port, in threads of the test process, for cutting a
    service off: `outage()` closes every open connection and refuses new ones (the port is
    closed) until `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self.refused_while_down = 0
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name="proxy-accept").start()

    def outage(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._connections.clear()

    def stop(self) -> None:
        self._stopped.set()
        self.outage()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by outage() or stop()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True,
                             name="proxy-pump").start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        peers = {client: upstream, upstream: client}
        try:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            while not self._stopped.is_set():
                for key, _ in selector.select(timeout=0.5):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    peers[key.fileobj].sendall(data)
        except (OSError, ValueError):  # a side closed, or outage() closed both
            return
        finally:
            selector.close()
            with self._lock:
                for sock in peers:
                    self._connections.discard(sock)
                    sock.close()
