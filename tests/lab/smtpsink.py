"""The lab's mail server: aiosmtpd on ADDRESS:PORT, every accepted message written to DIR as
<n>.eml with the acceptance time in <n>.json. Prints "ready" once listening.

Usage: python smtpsink.py ADDRESS PORT DIR
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        # A sink started again on the same directory (a server outage in bench/chaos.py) goes
        # on numbering after the messages already there.
        self.count = len(list(directory.glob("*.eml")))

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        accepted = time.time()
        self.count += 1
        (self.dir / f"{self.count:05d}.eml").write_bytes(envelope.content)
        (self.dir / f"{self.count:05d}.json").write_text(json.dumps({"accepted": accepted}))
        return "250 OK"


def main() -> int:
    address, port, directory = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    controller = Controller(Sink(directory), hostname=address, port=port)
    controller.start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
