"""The Python binding end to end against a real server: what an app relies on."""

import asyncio
import json
import secrets
import tarfile

import pytest

import cubby
from conftest import Recorder, eventually


def run(coro):
    return asyncio.run(coro)


async def on_both(phone, laptop, doc):
    """The phone's `doc` as the laptop holds it, once the laptop has every change to it."""
    await phone.wait_until_synced()
    await eventually(lambda: has_doc(laptop, doc.id()), "the laptop hears of the document")
    other = await laptop.open_document(doc.id())
    await eventually(lambda: done(other.to_json() == doc.to_json()), "the laptop has it all")
    return other


def test_two_devices_converge_live(device):
    async def scenario():
        phone = await device("alice", "phone")
        laptop = await device("alice", "laptop")
        doc = await phone.create("Groceries")
        await doc.put("milk", "2")
        on_laptop = await on_both(phone, laptop, doc)
        assert on_laptop.get("milk") == "2"

        heard = Recorder()
        subscription = on_laptop.subscribe(heard)
        await doc.put("eggs", json.dumps({"count": 12, "brown": True}))
        await heard.wait_for(
            lambda h: any(e == cubby.DocumentEvent.REMOTE() for _, e in h),
            "the laptop is told of the phone's edit",
        )
        await eventually(
            lambda: done(json.loads(on_laptop.to_json()) == json.loads(doc.to_json())),
            "both hold the same document",
        )
        assert json.loads(on_laptop.get("eggs")) == {"count": 12, "brown": True}
        assert on_laptop.heads() == doc.heads()
        subscription.cancel()

    run(scenario())


async def done(value):
    return value


def test_offline_edits_on_both_devices_merge(device):
    async def scenario():
        phone = await device("alice", "phone")
        laptop = await device("alice", "laptop")
        doc = await phone.create("Profile")
        await doc.put("address", json.dumps({"street": "Main St 1", "city": "Lyon"}))
        await doc.put_text("note", "hello world")
        other = await on_both(phone, laptop, doc)

        phone.pause_sync()
        laptop.pause_sync()
        # Both edit the same object and the same text while offline.
        await doc.put("address", json.dumps({"street": "Main St 2", "city": "Lyon"}))
        await other.put("address", json.dumps({"street": "Main St 1", "city": "Paris"}))
        await doc.splice_text("note", 0, 0, "oh, ")
        await other.splice_text("note", 11, 0, "!")
        assert set(await phone.unsynced()) == {doc.id()}
        phone.resume_sync()
        laptop.resume_sync()
        await phone.wait_until_synced()
        await laptop.wait_until_synced()

        async def merged():
            await phone.wait_until_synced()
            return json.loads(doc.to_json()) == json.loads(other.to_json())

        await eventually(merged, "both devices hold the merge")
        merged_doc = json.loads(doc.to_json())
        assert merged_doc["address"] == {"street": "Main St 2", "city": "Paris"}
        assert merged_doc["note"] == "oh, hello world!"

    run(scenario())


async def has_doc(client, doc_id):
    return doc_id in [d.id for d in await client.list()]


def test_status_reports_connecting_syncing_and_up_to_date(device):
    async def scenario():
        phone = await device("alice", "phone", autosync=False)
        for n in range(5):
            doc = await phone.create(f"note {n}")
            await doc.put("n", str(n))
        assert len(await phone.unsynced()) == 5
        heard = Recorder()
        subscription = phone.subscribe_status(heard)
        await heard.wait_for(lambda h: len(h) >= 1, "the current status")
        assert heard.heard[0].is_offline()
        phone.start_sync()
        await heard.wait_for(
            lambda h: any(s.is_up_to_date() for s in h), "the phone is up to date"
        )
        kinds = [s for s in heard.heard]
        connecting = next(i for i, s in enumerate(kinds) if s.is_connecting())
        syncing = [
            (i, s) for i, s in enumerate(kinds) if s.is_syncing() and s.total == 5
        ]
        up_to_date = next(i for i, s in enumerate(kinds) if s.is_up_to_date())
        assert syncing, f"no 'syncing n of 5' in {kinds}"
        assert connecting < syncing[0][0] < up_to_date
        assert all(0 <= s.done <= s.total for _, s in syncing)
        assert await phone.unsynced() == []
        subscription.cancel()

    run(scenario())


def test_revoked_device_is_told_and_wiped(device):
    async def scenario():
        phone = await device("alice", "phone")
        stolen = await device("alice", "stolen")
        doc = await stolen.create("Secrets")
        await doc.put("pin", "1234")
        await stolen.wait_until_synced()
        heard = Recorder()
        subscription = stolen.subscribe_status(heard)

        revoked = await phone.revoke_device(stolen.device_id())
        assert revoked.id == stolen.device_id()
        assert revoked.revoked_ms is not None
        await heard.wait_for(
            lambda h: cubby.SyncStatus.WIPED(cubby.WipeReason.DEVICE_REVOKED) in h,
            "the revoked device is told to wipe",
        )
        with pytest.raises(cubby.CubbyError.Wiped):
            await stolen.list()
        with pytest.raises(cubby.CubbyError.Wiped):
            await stolen.open_document(doc.id())
        devices = {d.name: d for d in await phone.devices()}
        assert devices["stolen"].revoked_ms is not None
        assert devices["phone"].this_device
        subscription.cancel()

    run(scenario())


def test_export_writes_a_bundle(device, tmp_path):
    async def scenario():
        phone = await device("alice", "phone")
        doc = await phone.create("Orders")
        await doc.put("order", json.dumps({"id": 7, "items": ["tea"]}))
        await phone.wait_until_synced()
        path = tmp_path / "export.tar"
        size = await phone.export(str(path))
        assert size == path.stat().st_size > 0
        with tarfile.open(path) as bundle:
            names = bundle.getnames()
            assert any(doc.id() in name for name in names), names
            exported = [
                json.load(bundle.extractfile(m))
                for m in bundle.getmembers()
                if doc.id() in m.name and m.name.endswith(".json")
            ]
        assert {"order": {"id": 7, "items": ["tea"]}} in exported, exported

    run(scenario())


def test_errors_are_typed_exceptions_with_codes(device, server, tmp_path):
    async def scenario():
        phone = await device("alice", "phone")
        unknown = "1" * 16
        with pytest.raises(cubby.CubbyError.UnknownDocument):
            await phone.open_document(unknown)
        doc = await phone.create("Notes")
        await doc.put("title", '"plain string"')
        with pytest.raises(cubby.CubbyError.InvalidChange) as refused:
            await doc.splice_text("title", 0, 0, "x")
        assert "text" in str(refused.value)
        with pytest.raises(cubby.CubbyError.InvalidChange):
            await doc.put("bad", "{not json")
        with pytest.raises(cubby.CubbyError.NotFound):
            await phone.revoke_device("1" * 16)
        with pytest.raises(cubby.CubbyError.Config) as short_key:
            await cubby.CubbyClient.open(
                cubby.ClientConfig(data_dir=str(tmp_path / "k"), local_key=b"short"), None
            )
        assert "32 bytes" in str(short_key.value)
        # Every code is a CubbyError, so one handler catches them all.
        assert issubclass(cubby.CubbyError.Offline, cubby.CubbyError)

    run(scenario())


def test_an_offline_server_is_an_offline_error(server, tmp_path):
    async def scenario():
        from conftest import Tokens

        client = await cubby.CubbyClient.open(
            cubby.ClientConfig(
                data_dir=str(tmp_path / "offline"),
                local_key=secrets.token_bytes(32),
                server="https://127.0.0.1:9",
                ca_pem=server.ca_pem,
                retry_pauses_ms=[50, 500],
            ),
            Tokens(server, "alice"),
        )
        doc = await client.create("Works offline")
        await doc.put("ok", "true")
        assert json.loads(doc.to_json()) == {"ok": True}
        with pytest.raises(cubby.CubbyError.Offline):
            await client.devices()
        with pytest.raises(cubby.CubbyError.Offline):
            await client.wait_until_synced()

    run(scenario())
