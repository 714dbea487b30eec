"""A real cubby-server per test, started from the workspace's build, and helpers to wait on
callbacks with a deadline."""

import asyncio
import os
import pathlib
import secrets
import subprocess
import threading
import time

import pytest

import cubby

REPO = pathlib.Path(__file__).resolve().parents[4]
SERVER_BIN = os.environ.get("CUBBY_SERVER_BIN", str(REPO / "target" / "debug" / "cubby-server"))
DEADLINE = 30.0


class Server:
    """A cubby-server in development mode on a free port, with its own data directory."""

    def __init__(self, root: pathlib.Path):
        self.data = root / "server"
        self.log = open(root / "server.log", "w")
        out = root / "server.out"
        with open(out, "w") as stdout:
            self.proc = subprocess.Popen(
                [SERVER_BIN, "--data", str(self.data), "--listen", "127.0.0.1:0"],
                stdout=stdout,
                stderr=self.log,
            )
        deadline = time.monotonic() + DEADLINE
        while True:
            first = out.read_text().splitlines()
            if first and "listening on" in first[0]:
                self.url = first[0].split()[-1]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cubby-server did not start; see {self.log.name}")
            time.sleep(0.02)
        self.ca_pem = (self.data / "tls" / "cert.pem").read_text()

    def token(self, customer: str) -> str:
        return subprocess.check_output(
            [SERVER_BIN, "dev-token", "--data", str(self.data), "--customer", customer],
            text=True,
            stderr=subprocess.DEVNULL,
        ).strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=DEADLINE)
        self.log.close()


class Tokens(cubby.TokenProvider):
    """The app's identity provider, as the SDK asks it: here, the dev tenant's tokens."""

    def __init__(self, server: Server, customer: str):
        self.server, self.customer = server, customer

    def token(self, refresh: bool) -> str:
        return self.server.token(self.customer)


class Recorder(cubby.StatusListener, cubby.DocumentListener):
    """Records what the callbacks heard, for a test to wait on."""

    def __init__(self):
        self.heard = []
        self.cond = threading.Condition()

    def _add(self, item):
        with self.cond:
            self.heard.append(item)
            self.cond.notify_all()

    def on_status(self, status):
        self._add(status)

    def on_event(self, doc_id, event):
        self._add((doc_id, event))

    async def wait_for(self, predicate, what: str):
        def wait():
            with self.cond:
                return self.cond.wait_for(lambda: predicate(self.heard), timeout=DEADLINE)

        if not await asyncio.to_thread(wait):
            raise AssertionError(f"not within {DEADLINE} s: {what}; heard {self.heard}")


async def eventually(check, what: str):
    """Awaits `check()` (an async function) until it is true, or fails after the deadline."""
    deadline = time.monotonic() + DEADLINE
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def device(server, tmp_path):
    """Opens a device of `customer`: `await device("alice", "phone")`."""
    opened = []

    async def open_device(customer: str, name: str, **config) -> cubby.CubbyClient:
        config.setdefault("retry_pauses_ms", [50, 500])
        client = await cubby.CubbyClient.open(
            cubby.ClientConfig(
                data_dir=str(tmp_path / f"{customer}-{name}"),
                local_key=secrets.token_bytes(32),
                server=server.url,
                ca_pem=server.ca_pem,
                device_name=name,
                platform="python",
                **config,
            ),
            Tokens(server, customer),
        )
        opened.append(client)
        return client

    yield open_device

    async def shut_down():
        for client in opened:
            await client.shutdown()

    # Stopped before the interpreter exits: no callback may call into a finalizing Python.
    asyncio.run(shut_down())
