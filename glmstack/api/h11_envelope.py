"""uvicorn's h11 protocol, answering in the error envelope.

h11 refuses a request head that is malformed, or that is still incomplete past MAX_HEAD_BYTES (a 100 KB
header sent in pieces stops here; one that arrives whole is refused by limits.RequestHeadCheck). uvicorn then
answers with plain text and closes at once; this subclass sends the documented envelope instead, so that
nothing leaves the server in another shape, and closes the way HTTP servers must when a request is left
unread (RFC 9112 §9.6): closing with unread data makes the kernel reset the connection, and the client would
likely lose the answer.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from glmstack.api.errors import PlatformError
from glmstack.api.limits import MAX_HEAD_BYTES

# How long the rest of a refused request is read and dropped before the connection is closed anyway.
LINGER_S = 2.0


class EnvelopeH11Protocol(H11Protocol):
    refused = False

    def data_received(self, data: bytes) -> None:
        if not self.refused:  # otherwise: more of a request already answered, dropped
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        self.refused = True
        error = PlatformError(1210, f"the request head is malformed or larger than {MAX_HEAD_BYTES} bytes")
        body = json.dumps(error.body(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=400, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        # Our side is done; the client's EOF closes the connection (eof_received), or the timer does.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
