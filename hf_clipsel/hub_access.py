"""A fast, one-line failure when the Hugging Face Hub cannot be reached.

Without it, an unreachable endpoint costs a user about a minute of retries before one clear line: huggingface_hub's
``http_backoff`` retries every connection error 5 times (waits of 1, 2, 4, 8, 8 s) for each file (the checkpoint's
config.json is asked for twice: by the family check and by ``from_pretrained``), and logs every retry. One request to
the endpoint, with a short timeout, tells before any of that whether the Hub answers at all; it is made only for a
name that is a Hub repo id (not a local path) and only when offline mode is off, once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

from huggingface_hub import constants, is_offline_mode
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import get_session, validate_repo_id

try:  # the HTTP client under huggingface_hub's session: httpx2 from huggingface_hub 2, httpx before
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

PROBE_TIMEOUT = 5.0  # seconds to connect and answer; a Hub that answers at all does so in well under a second


def check_hub_reachable(name: str | None, purpose: str) -> None:
    """Raise a one-line OSError when ``name`` is a Hub repo id, offline mode is off and the Hub endpoint
    (``HF_ENDPOINT``) does not answer. ``purpose`` says what the run wanted, e.g. "load the model"."""
    if not name or is_offline_mode() or not is_hub_repo_id(name):
        return
    problem = endpoint_problem(constants.ENDPOINT)
    if problem:
        raise OSError(
            f"the Hugging Face Hub cannot be reached at {constants.ENDPOINT} ({problem}) to {purpose} {name}: pass a "
            "local path instead, or set HF_HUB_OFFLINE=1 to use the copy in your Hugging Face cache."
        )


def is_hub_repo_id(name: str | None) -> bool:
    """Whether ``name`` would be read from the Hub: not a path of this machine, and a valid repo id."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@functools.cache
def endpoint_problem(endpoint: str) -> str:
    """Why ``endpoint`` does not answer ("" when it answers with any HTTP status). Asked once per process."""
    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT, follow_redirects=False)
    except TransportError as error:  # refused, DNS failure, timeout, proxy error: no answer at all
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return ""
