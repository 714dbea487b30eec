"""The Python binding's figures, beside the Rust SDK's from examples/sdk_latency.rs (same
workload, same settings; client/ffi/bench.sh runs both against one release server):
device-to-device latency of isolated edits (p50, p99), cold start to first sync of 100
documents, an idle client's memory. Prints one JSON object."""

import asyncio
import json
import math
import os
import pathlib
import shlex
import subprocess
import threading
import time

import cubby


def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Tokens(cubby.TokenProvider):
    def token(self, refresh):
        return subprocess.check_output(shlex.split(os.environ["CUBBY_TOKEN_COMMAND"]), text=True).strip()


class Heard(cubby.DocumentListener):
    """Notes when the far device's callback sees the value the benchmark waits for."""

    def __init__(self, far):
        self.far, self.expect, self.at = far, None, None
        self.event = threading.Event()

    def on_event(self, doc_id, event):
        if event.is_remote() and self.far.get("n") == self.expect:
            self.at = time.perf_counter()
            self.event.set()


def quantile(samples, q):
    """Nearest rank, as the Rust side's."""
    ordered = sorted(samples)
    return ordered[min(max(math.ceil(q * len(ordered)), 1), len(ordered)) - 1]


async def device(root, name):
    return await cubby.CubbyClient.open(
        cubby.ClientConfig(
            data_dir=str(root / name),
            local_key=bytes([7] * 32),
            server=os.environ["CUBBY_SERVER"],
            ca_pem=pathlib.Path(os.environ["CUBBY_CA"]).read_text(),
            device_name=name,
        ),
        Tokens(),
    )


async def main():
    edits = int(os.environ.get("EDITS", "1000"))
    root = pathlib.Path(os.environ["BENCH_DIR"]) / "python"
    bare_rss = rss_kib()
    writer = await device(root, "writer")
    await writer.wait_until_synced()
    idle_rss = rss_kib()
    reader = await device(root, "reader")
    doc = await writer.create("latency")
    await doc.put("n", "0")
    await writer.wait_until_synced()
    while True:
        try:
            far = await reader.open_document(doc.id())
            break
        except cubby.CubbyError.UnknownDocument:
            await reader.wait_until_synced()
    heard = Heard(far)
    subscription = far.subscribe(heard)
    samples = []
    for n in range(1, edits + 1):
        heard.expect, heard.at = str(n), None
        heard.event.clear()
        started = time.perf_counter()
        await doc.put("n", str(n))
        if not await asyncio.to_thread(heard.event.wait, 30):
            raise SystemExit(f"edit {n} never reached the other device")
        samples.append(heard.at - started)
    subscription.cancel()

    for n in range(100):
        cold = await writer.create(f"cold {n}")
        await cold.put("n", str(n))
    await writer.wait_until_synced()
    started = time.perf_counter()
    fresh = await device(root, "fresh")
    await fresh.wait_until_synced()
    cold_start = time.perf_counter() - started
    assert len(await fresh.list()) >= 100

    print(json.dumps({
        "sdk": "python",
        "edits": edits,
        "latency_p50_ms": round(quantile(samples, 0.5) * 1e3, 3),
        "latency_p99_ms": round(quantile(samples, 0.99) * 1e3, 3),
        "cold_start_100_docs_ms": round(cold_start * 1e3, 1),
        "idle_client_rss_kib": idle_rss,
        "python_without_client_rss_kib": bare_rss,
    }))
    for client in (writer, reader, fresh):
        await client.shutdown()


asyncio.run(main())
