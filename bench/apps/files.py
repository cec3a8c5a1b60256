"""W5/W6: tidewire's file routes, on whichever ASGI server the harness starts.

Storage is the local folder `$TIDEWIRE_DATA_DIR` (as `tidewire serve` would pick it);
`$BENCH_ACCEL`, when set, is `Settings.accel_redirect`: downloads are answered with an
`X-Accel-Redirect` for the nginx in front to send.
"""

import os

from tidewire import Tidewire
from tidewire.config import Settings

tw = Tidewire(settings=Settings(accel_redirect=os.environ.get("BENCH_ACCEL") or None))
app = tw.app
