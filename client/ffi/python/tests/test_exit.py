"""A script that ends right after its last call exits cleanly: no Cubby thread is still inside
Python when the interpreter finalizes (it would be killed there and abort the process)."""

import subprocess
import sys
import textwrap

from conftest import DEADLINE

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, cubby

    async def main():
        client = await cubby.CubbyClient.open(
            cubby.ClientConfig(data_dir=sys.argv[1], local_key=bytes(32)), None)
        plain = await client.create("plain")
        await plain.put("s", '"' + "x" * 1_000_000 + '"')
        text = await client.create("text")
        await text.put_text("t", "y" * 1_000_000)
        await client.shutdown()

    asyncio.run(main())
    """
)


def test_a_script_exits_cleanly_after_its_last_call(tmp_path):
    for run in range(5):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / f"device-{run}")],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert done.returncode == 0, f"run {run}: exit {done.returncode}: {done.stderr}"
        assert "FATAL" not in done.stderr, done.stderr
