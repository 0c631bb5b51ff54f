"""A real SMTP server for tests/notify.rs: aiosmtpd, which nobody here wrote.

Usage: smtp_sink.py OUT_DIR [USER PASSWORD]
Listens on 127.0.0.1 on a free port and prints `port <N>` once it accepts connections.
Each message received is written to OUT_DIR/<n>.eml (the raw message) with
OUT_DIR/<n>.json (envelope sender, recipients, and the AUTH login used, if any). With USER
and PASSWORD, AUTH PLAIN/LOGIN is offered without TLS (a local test server only) and
required; a wrong password is refused.
"""

import asyncio
import json
import os
import socket
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    def __init__(self, out):
        self.out = out
        self.n = 0

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        base = os.path.join(self.out, str(self.n))
        login = session.auth_data.login.decode() if session.auth_data else None
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".json.tmp", "w") as f:
            json.dump(
                {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos, "login": login},
                f,
            )
        # The .json appears last and whole: the test waits for it.
        os.replace(base + ".eml.tmp", base + ".eml")
        os.replace(base + ".json.tmp", base + ".json")
        return "250 OK"


def main():
    out = sys.argv[1]
    creds = sys.argv[2:4] if len(sys.argv) >= 4 else None

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and creds is not None
            and auth_data.login.decode() == creds[0]
            and auth_data.password.decode() == creds[1]
        )
        # handled=False: the server answers (235, or 535 on a wrong password).
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    port = free_port()
    kwargs = {}
    if creds:
        kwargs = dict(authenticator=authenticator, auth_required=True, auth_require_tls=False)
    controller = Controller(Sink(out), hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    print(f"port {port}", flush=True)
    try:
        # Until the test closes stdin (or kills us).
        sys.stdin.read()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
