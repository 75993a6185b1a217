"""uvicorn's server with afs-serve's shutdown: on SIGTERM or SIGINT it marks the afs server as
draining (503 for anything that still arrives, /health 503), lets uvicorn stop accepting and wait
for in-flight requests (up to timeout_graceful_shutdown), and returns normally, so the process
exits with status 0 instead of re-raising the signal."""

from __future__ import annotations

import asyncio
import signal

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        self.state.draining = True
        super().handle_exit(sig, frame)

    async def serve(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            await self._serve(sockets)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
