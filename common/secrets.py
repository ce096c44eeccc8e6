"""Secrets kept out of what others read: config values whose key names a secret and the
credentials, query values and fragments of URLs are masked wherever a config, a command line or
a message is written (trackers' files, stats, logs)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "***"
URL_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
"""A URL inside any text: a scheme, ``://`` and what follows up to a space or a quote."""
SECRET_WORDS = frozenset(
    (
        "apikey",
        "auth",
        "authorization",
        "bearer",
        "cookie",
        "credential",
        "credentials",
        "passphrase",
        "passwd",
        "password",
        "pwd",
        "secret",
        "signature",
        "token",
    )
)
"""A key holding one of these words (``hf_token``, ``Authorization``, ``aws_secret_access_key``)
names a secret; so does one holding ``key`` after ``api``, ``access``, ``private`` or
``secret`` (``api_key``, ``X-API-Key``)."""
KEY_QUALIFIERS = frozenset(("api", "access", "private", "secret", "signing", "session"))


def names_secret(key: str) -> bool:
    """Whether a config key (any depth, flattened ``a/b/c`` too) names a secret: a word of it
    (split at ``_ - / .``, spaces and camelCase) is in ``SECRET_WORDS`` or is ``key`` after a
    word of ``KEY_QUALIFIERS``. ``max_new_tokens`` is not one (``tokens`` is not ``token``)."""
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", key)]
    return any(
        word in SECRET_WORDS or (word == "key" and index and words[index - 1] in KEY_QUALIFIERS)
        for index, word in enumerate(words)
    )


def masked_url(url: str) -> str:
    """``url`` with ``***`` for its credentials (``user:password@``), each query value and its
    fragment; the scheme, host, port and path stay. A URL with none of them is returned as is."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: nothing of it is shown
        return f"{url.partition('://')[0]}://{MASK}"
    userinfo, at, host = parts.netloc.rpartition("@")
    if not (at or parts.query or parts.fragment):
        return url
    query = "&".join(
        f"{name.partition('=')[0]}={MASK}" if name else "" for name in parts.query.split("&")
    )
    return urllib.parse.urlunsplit(
        (
            parts.scheme,
            f"{MASK}@{host}" if at else host,
            parts.path,
            query,
            MASK if parts.fragment else "",
        )
    )


def masked_text(text: str) -> str:
    """``text`` with every URL in it masked (``masked_url``)."""
    return URL_PATTERN.sub(lambda match: masked_url(match.group()), text)


def masked_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (``JobConfig.model_dump()``, ``PPOConfig.to_dict()``, any nested
    or flattened mapping) fit to be written where others read it, such as a tracker's files: at
    any depth, the value of a key that names a secret (``names_secret``) is ``***``, and every
    URL inside a string keeps its scheme, host and path but not its credentials, query values or
    fragment (``masked_url``). Used by every tracker that records the config."""
    return {key: _masked(key, value) for key, value in values.items()}


def _masked(key: Any, value: Any) -> Any:
    if value is not None and isinstance(key, str) and names_secret(key):
        return MASK
    if isinstance(value, str):
        return masked_text(value)
    if isinstance(value, Mapping):
        return masked_config(value)
    if isinstance(value, (list, tuple)):
        return [_masked(None, item) for item in value]
    return value


def masked_argument(argument: str) -> str:
    """A command-line argument fit to be recorded: ``--set reward.kwargs.api_key=...`` loses its
    value, and any URL in it is masked (``masked_text``)."""
    key, sep, value = argument.partition("=")
    if sep and names_secret(key):
        return f"{key}={MASK}"
    return masked_text(argument)
