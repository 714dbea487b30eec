"""Cubby's client SDK for Python: offline-first, encrypted documents synced with a Cubby server.

The classes are UniFFI's bindings of the Rust SDK (`cubby.cubby`, generated at build time);
this module re-exports them and stops Cubby's threads when the interpreter exits.
"""

import atexit as _atexit

from .cubby import *  # noqa: F401,F403
from .cubby import shutdown_runtime as _shutdown_runtime

# A Cubby thread still waking an awaited call when Python finalizes would be killed inside
# Rust and abort the process: stop them first, while the interpreter is whole.
_atexit.register(_shutdown_runtime)
