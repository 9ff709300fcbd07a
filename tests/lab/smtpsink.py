"""The lab's mail server: aiosmtpd on ADDRESS:PORT, every accepted message written to DIR as
<n>.eml with the acceptance time in <n>.json. Prints "ready" once listening.

Usage: python smtpsink.py ADDRESS PORT DIR [USER:PASSWORD]

With USER:PASSWORD, AUTH (PLAIN or LOGIN, without TLS) with exactly these is required before any
mail is taken: a client given the wrong password delivers nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


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


def authenticator(user: str, password: str) -> Any:
    def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            user.encode(),
            password.encode(),
        )
        return AuthResult(success=ok)

    return check


def main() -> int:
    address, port, directory = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    auth: dict[str, Any] = {}
    if len(sys.argv) > 4:
        # The lab's mail crosses its own namespaces only: AUTH without TLS is what is tested.
        warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
        user, password = sys.argv[4].split(":", 1)
        auth = {
            "authenticator": authenticator(user, password),
            "auth_required": True,
            "auth_require_tls": False,
        }
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's notes on each AUTH
    controller = Controller(Sink(directory), hostname=address, port=port, **auth)
    controller.start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
