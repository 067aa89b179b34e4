"""Requests to the Hugging Face Hub that fail with one line naming the reason and the fix.

huggingface_hub raises its transport's own errors (``httpx.ConnectError: Name or service not known``)
without saying what was being contacted; :func:`hub_request` turns the usual failures (offline mode, no
token, a refused token, an unreachable Hub) into a :class:`~visreg_hub.errors.HubRequestError`.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

from visreg_hub.errors import HubRequestError, printable

T = TypeVar("T")


def hub_request(what: str, call: Callable[[], T], *, fix: str) -> T:
    """``call()`` (one or more Hub requests), its failures as one :class:`HubRequestError`.

    Args:
        what: what is being done, for the message (``"push_to_hub me/model"``).
        call: the requests.
        fix: the way around the Hub, ending each message (``"or save_pretrained() and upload later"``).

    Raises:
        HubRequestError: ``HF_HUB_OFFLINE`` is set (checked before any request), no token, the Hub
            refused the request (HTTP status), or the Hub could not be reached (DNS, refused, TLS,
            timeout). Other errors pass through unchanged.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise HubRequestError(f"{what} needs the Hugging Face Hub but HF_HUB_OFFLINE is set; unset it, {fix}")
    try:
        return call()
    except LocalTokenNotFoundError as exc:
        raise HubRequestError(f"{what}: no Hub token; run `hf auth login` or set HF_TOKEN, {fix}") from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        said = printable(" ".join(str(exc.server_message or "").split()))[:200]  # the Hub's own words, if any
        reason, action = _refusal(status)
        why = "; ".join(part for part in (said, reason) if part)
        if not why:  # nothing named: nothing to fix by name
            why, action = "no reason given", "check the repository name and the token, and try again"
        message = f"{what}: the Hub refused the request (HTTP {status}: {why}); {action}, {fix}"
        raise HubRequestError(message) from exc
    except Exception as exc:
        if not _unreachable(exc):
            raise
        raise HubRequestError(
            f"{what}: the Hugging Face Hub at {constants.ENDPOINT} is unreachable ({type(exc).__name__}: "
            f"{exc}); {fix}"
        ) from exc


def _refusal(status: int | None) -> tuple[str | None, str]:
    """``(why the Hub answered status, what to do)``; why is None where the Hub's own message says it."""
    if status in (401, 403):
        return "the token is missing, invalid or read-only", "set HF_TOKEN to a token with write access"
    if status == 404:
        return "no such repository or revision, or the token cannot see it", "check the name and HF_TOKEN"
    if status == 429:
        return "too many requests", "wait a minute and try again"
    if status is not None and status >= 500:
        return "the Hub failed", "try again later"
    return None, "fix what it names and try again"


def _unreachable(exc: BaseException) -> bool:
    """A transport failure: OS-level (DNS, refused, TLS) or the HTTP client's own transport errors, whose
    module varies with the huggingface_hub version (httpx, httpx2, requests)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    network = (ConnectionError, TimeoutError, socket.gaierror, ssl.SSLError)  # not every OSError: a full disk
    return isinstance(exc, network) or bool(names & {"TransportError", "ConnectionError"})
