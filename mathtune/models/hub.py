"""Hugging Face hub access: offline rules, a quick reachability probe, and the messages users see."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from mathtune.errors import MathtuneError, first_line

def _hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import is_offline_mode

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or is_offline_mode()


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint.

    Without it, an unreachable hub costs ~25 s of library retries before failing; with it the
    caller falls back to the local HF cache at once. Behind a proxy the direct connect says
    nothing, so the library is left to try.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_local_only() -> bool:
    """Read only the local HF cache: offline mode is set, or the hub does not answer a TCP connect."""
    return _hub_offline() or not _hub_reachable()


def hub_error(hub_id: str, exc: BaseException, *, offline: bool, allow_pickle: bool) -> MathtuneError:
    local = f" (and no local path '{hub_id}')"
    if offline:
        return MathtuneError(
            f"could not load '{hub_id}' from the Hugging Face hub (offline?){local}: "
            f"use smollm2-135m, a local model dir or a .gguf file"
        )
    message = str(exc)
    if not allow_pickle and "safetensors" in message.lower():
        return MathtuneError(
            f"'{hub_id}' on the hub has no safetensors weights: pass --allow-pickle to load its pickle "
            f"checkpoint (only if you trust it)"
        )
    return MathtuneError(
        f"could not load '{hub_id}' from the Hugging Face hub{local}: {first_line(exc)}: "
        f"use smollm2-135m, a local model dir or a .gguf file"
    )

