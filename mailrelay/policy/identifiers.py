"""Amazon identifiers found in message text: order ids and thread tokens.

Opt-out notices name only the order, so order ids are what ties a notice to a buyer; the
``[commMgrTok:...]`` token is Amazon's communication-manager message id, which a reply must
carry back to stay on the buyer's thread (amazon.md sections 1.1, 4.3).
"""

from __future__ import annotations

import re

ORDER_ID_RE = re.compile(r"(?<![0-9-])(\d{3}-\d{7}-\d{7})(?![0-9-])")
COMM_TOKEN_RE = re.compile(r"\[commMgrTok:\s*([A-Za-z0-9]{1,120})\s*\]")


def find_order_ids(text: str) -> list[str]:
    """Order ids in ``text``, in order of first appearance, without repeats."""
    return list(dict.fromkeys(ORDER_ID_RE.findall(text or "")))


def find_comm_tokens(text: str) -> list[str]:
    """``commMgrTok`` values in ``text``, in order of first appearance, without repeats."""
    return list(dict.fromkeys(COMM_TOKEN_RE.findall(text or "")))
