"""The client stands on its own: importing it loads no web framework."""

from __future__ import annotations

import json
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


def test_a_client_loads_what_it_uses_when_it_uses_it() -> None:
    """A client that moves files (a script, `tidewire download`) loads neither websockets
    nor PyJWT, nor the server's settings (pydantic): they are imported where a
    WebSocket is opened, a token read, `tidewire.Settings` asked for."""
    code = (
        "import json, sys, tidewire, tidewire.client\n"
        "with tidewire.Client('http://127.0.0.1:1') as client:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)} | set(json.loads(out.stdout))
    assert loaded & {"websockets", "jwt", "pydantic", "tidewire.config"} == set()


def test_the_package_names_the_users_api() -> None:
    import tidewire

    assert sorted(tidewire.__all__) == sorted(
        ["AsyncClient", "Blob", "Client", "Message", "Settings", "Tidewire", "__version__"]
    )
    assert tidewire.Tidewire.__name__ == "Tidewire"  # loaded on first use
    for name in tidewire.__all__:
        assert getattr(tidewire, name) is not None, name
