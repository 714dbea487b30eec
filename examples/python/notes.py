"""A small notes app on Cubby: notes live on this device, work offline, and sync to every other
device of the same customer.

    python examples/python/notes.py add "buy milk"
    python examples/python/notes.py list
    python examples/python/notes.py done <note>
    python examples/python/notes.py watch          # prints other devices' edits as they arrive

Against the development server (`cargo run -p cubby-server`, from the repository's root) it needs
no settings. Otherwise: CUBBY_SERVER (https://localhost:7443), CUBBY_CA (the server's
certificate, ./cubby-data/tls/cert.pem), CUBBY_TOKEN_COMMAND (prints a token for the customer;
the dev server's `dev-token` for alice), NOTES_DIR (this device's data, ./notes-device).
"""

import asyncio
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cubby

SERVER = os.environ.get("CUBBY_SERVER", "https://localhost:7443")
CA = os.environ.get("CUBBY_CA", "cubby-data/tls/cert.pem")
TOKEN_COMMAND = os.environ.get(
    "CUBBY_TOKEN_COMMAND", "target/debug/cubby-server dev-token --customer alice"
)
DEVICE = Path(os.environ.get("NOTES_DIR", "notes-device"))
TITLE = "Notes"


class Tokens(cubby.TokenProvider):
    """Asks the identity provider (here, a command) for a token whenever Cubby connects."""

    def token(self, refresh: bool) -> str:
        try:
            return subprocess.check_output(shlex.split(TOKEN_COMMAND), text=True).strip()
        except (OSError, subprocess.CalledProcessError) as err:
            raise cubby.TokenError.Failed(f"{TOKEN_COMMAND!r} failed: {err}")


def local_key() -> bytes:
    """The key that encrypts this device's store. A real app keeps it in the OS keychain."""
    path = DEVICE / "local.key"
    if not path.exists():
        DEVICE.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


async def open_client() -> cubby.CubbyClient:
    return await cubby.CubbyClient.open(
        cubby.ClientConfig(
            data_dir=str(DEVICE / "store"),
            local_key=local_key(),
            server=SERVER,
            ca_pem=Path(CA).read_text() if Path(CA).exists() else None,
            device_name=f"notes on {os.uname().nodename}",
            platform="python",
        ),
        Tokens(),
    )


async def notes_document(client: cubby.CubbyClient) -> cubby.Document:
    """The customer's one notes document: found among those synced, or made on first use."""
    try:
        await client.wait_until_synced()
    except cubby.CubbyError as err:
        print(f"(offline: {err}; showing this device's copy)", file=sys.stderr)
    for info in await client.list():
        if info.title == TITLE:
            return await client.open_document(info.id)
    return await client.create(TITLE)


def show(doc: cubby.Document):
    notes = json.loads(doc.to_json())
    for key, note in sorted(notes.items(), key=lambda kv: kv[1].get("at", 0)):
        print(f"{key}  [{'x' if note.get('done') else ' '}] {note.get('text', '')}")
    if not notes:
        print("no notes yet: add one with `notes.py add TEXT`")


async def main(args):
    client = await open_client()
    try:
        doc = await notes_document(client)
        match args:
            case ["add", *words]:
                key = secrets.token_hex(3)
                note = {"text": " ".join(words), "done": False, "at": int(time.time() * 1000)}
                await doc.put(key, json.dumps(note))
                print(f"added {key}")
            case ["done", key]:
                if doc.get(key) is None:
                    sys.exit(f"no note {key}")
                # Only `done` changes: another device's edit of the text survives the merge.
                note = json.loads(doc.get(key))
                await doc.put(key, json.dumps({**note, "done": True}))
            case ["list"]:
                show(doc)
                return
            case ["watch"]:
                await watch(doc)
                return
            case _:
                sys.exit(__doc__)
        try:
            await client.wait_until_synced()
        except cubby.CubbyError.Offline:
            print("saved on this device; it syncs when the server is reachable")
    finally:
        await client.shutdown()


async def watch(doc: cubby.Document):
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    class Listener(cubby.DocumentListener):
        def on_event(self, doc_id, event):
            if event.is_remote():
                loop.call_soon_threadsafe(changed.set)

    subscription = doc.subscribe(Listener())
    show(doc)
    try:
        while True:
            await changed.wait()
            changed.clear()
            print("-- changed on another device:")
            show(doc)
    finally:
        subscription.cancel()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
    except cubby.CubbyError as err:
        sys.exit(f"notes: {type(err).__name__}: {err}")
