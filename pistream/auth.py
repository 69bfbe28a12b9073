"""Authorization headers, computed before any request: WebSocket clients cannot answer a 401 challenge,
so the same header must ride on the REST calls and on the channel upgrade alike.
"""

from __future__ import annotations

import base64


def basic_header(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}
