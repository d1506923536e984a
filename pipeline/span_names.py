"""Span names with ids in them, folded into templates: ``/users/123`` -> ``/users/{id}``.

Instrumentations should name spans by route (``GET /users/{id}``), but some put the URL in:
every user, order or session is then a new operation, and a service soon has more than
``windows.max_operations_per_service``. Before names go to the overflow series, the
cardinality limit (``pipeline/windows.py``) folds the names that differ only in ids into one
template, so ``/users/{id}`` keeps its own latency and error rate.

``template`` splits a name at ``/ ? & = : , ; . @`` and whitespace and replaces each piece
that looks like an id with ``{id}``: a number (``123``, ``-4``), a UUID, a hex string of 8 or
more characters with a digit in it (``5f1a2b3c``, object ids, hashes), or a run of 16 or more
letters and digits with at least two digits (tokens, base64 ids). Words stay (``users``,
``v2``, ``api``, ``index.html``). A name without such a piece is its own template.
"""

from __future__ import annotations

import re

ID = "{id}"
_SPLIT = re.compile(r"([/?&=:,;.@\s]+)")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NUMBER = re.compile(r"[-+]?\d+")
_HEX = re.compile(r"(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}")
_TOKEN = re.compile(r"(?=(?:[^\d]*\d){2})[A-Za-z0-9_\-]{16,}")
_HAS_DIGIT = re.compile(r"\d")


def is_id(piece: str) -> bool:
    return bool(
        _NUMBER.fullmatch(piece) or _UUID.fullmatch(piece) or _HEX.fullmatch(piece) or _TOKEN.fullmatch(piece)
    )


def template(name: str) -> str:
    """``name`` with every id-like piece replaced by ``{id}`` (the name itself when it has none)."""
    if not _HAS_DIGIT.search(name):
        return name  # no digit, no id: the common case, cheap
    parts = _SPLIT.split(name)
    return "".join(ID if i % 2 == 0 and part and is_id(part) else part for i, part in enumerate(parts))
