"""The Python notes app in examples/ works as the README says: a note added on one device is
listed on another."""

import os
import shlex
import subprocess
import sys

from conftest import REPO, SERVER_BIN, DEADLINE

APP = REPO / "examples" / "python" / "notes.py"


def notes(server, tmp_path, device, *args):
    env = {
        **os.environ,
        "CUBBY_SERVER": server.url,
        "CUBBY_CA": str(server.data / "tls" / "cert.pem"),
        "CUBBY_TOKEN_COMMAND": shlex.join(
            [SERVER_BIN, "dev-token", "--data", str(server.data), "--customer", "alice"]
        ),
        "NOTES_DIR": str(tmp_path / device),
    }
    done = subprocess.run(
        [sys.executable, str(APP), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_note_added_on_one_device_is_listed_on_another(server, tmp_path):
    added = notes(server, tmp_path, "phone", "add", "buy", "milk")
    key = added.split()[-1]
    listed = notes(server, tmp_path, "laptop", "list")
    assert f"{key}  [ ] buy milk" in listed
    notes(server, tmp_path, "laptop", "done", key)
    assert f"{key}  [x] buy milk" in notes(server, tmp_path, "phone", "list")
