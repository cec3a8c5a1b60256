"""The client stands on its own: importing it loads no web framework."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_client_loads_no_web_framework() -> None:
    # A fresh interpreter: this test process has imported the server already.
    code = (
        "import sys, tidewire, tidewire.client\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'fastapi', 'starlette'})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_package_names_the_users_api() -> None:
    import tidewire

    assert sorted(tidewire.__all__) == sorted(
        ["AsyncClient", "Blob", "Client", "Message", "Settings", "Tidewire", "__version__"]
    )
    assert tidewire.Tidewire.__name__ == "Tidewire"  # loaded on first use
