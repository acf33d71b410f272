"""`domainlm serve`: check everything, bind the port, load, serve (or --smoke.run: ask, print, stop).

Order matters for the user: what can be refused in a second is checked before what takes
seconds to load, so a port in use, a model without a chat template, an adapter for another
base, an index built with another embedder or a missing API key file is one line at once.
The port is bound here and the socket handed to uvicorn, so it cannot be taken in between.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from domainlm.errors import UserError
from domainlm.progress import log, summary
from domainlm.serve.config import ServeConfig


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"host {host!r} does not resolve ({e.strerror}); give an address such as 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    # The protocol number matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
    # proto is IPPROTO_TCP, and with Nagle on every small response waits ~40 ms for an ACK.
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?); pass --port N, or --port 0 for a "
                            "free one") from None
        if e.errno == errno.EACCES:
            raise UserError(f"port {port} on {host}: permission denied (ports below 1024 need root); pass --port N "
                            "above 1023") from None
        raise UserError(f"cannot bind {host}:{port} ({e.strerror}); check --host and --port") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def api_key(cfg: ServeConfig) -> str | None:
    if cfg.api_key_file:
        try:
            with open(cfg.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise UserError(f"api_key_file {cfg.api_key_file!r} cannot be read ({e.strerror}); give a file whose "
                            "first line is the key") from None
        if not key:
            raise UserError(f"api_key_file {cfg.api_key_file!r} is empty; put the key on its first line")
        return key
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise UserError(f"api_key_env: the environment variable {cfg.api_key_env} is unset or empty; export it "
                            "with the key")
        return key
    return None


def serve(cfg: ServeConfig) -> int:
    """Entry point of `domainlm serve`."""
    from domainlm.serve import setup

    t0 = time.perf_counter()
    key = api_key(cfg)
    sock = bind(cfg.host, cfg.port)
    served = None
    try:
        checked = setup.check(cfg)
        served = setup.load(cfg, checked)
        from domainlm.serve.app import build_app

        app = build_app(served, key)
        host, port = sock.getsockname()[:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        summary("domainlm serve", setup.describe(cfg, served, url, key is not None) +
                [("ready in", f"{time.perf_counter() - t0:.1f}s")])
        if key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s with no API key: anyone who reaches this port can use it "
                        "(set --api-key-file or --api-key-env)", cfg.host)
        if cfg.smoke.run:
            from domainlm.serve.smoke import smoke

            return smoke(app, sock, url, key, served, cfg)
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                               timeout_graceful_shutdown=5, server_header=False))
        server.run(sockets=[sock])
        return 0
    finally:
        sock.close()
        if served is not None:
            setup.close(served)
