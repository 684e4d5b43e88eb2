"""Recognise Amazon marketplace buyer aliases.

A buyer alias is ``<local>[+<case>]@marketplace.amazon.<tld>`` (amazon.md section 1.2). The
blocklist is keyed by ``local@domain`` in lower case without the per-case suffix, because the
part before ``+`` is stable for one buyer while the suffix changes per support case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

#: The 22 marketplace alias domains that have MX records (amazon.md section 1.2), by marketplace.
MARKETPLACE_DOMAINS: dict[str, str] = {
    "marketplace.amazon.com": "US",
    "marketplace.amazon.ca": "CA",
    "marketplace.amazon.com.mx": "MX",
    "marketplace.amazon.com.br": "BR",
    "marketplace.amazon.co.uk": "UK",
    "marketplace.amazon.de": "DE",
    "marketplace.amazon.fr": "FR",
    "marketplace.amazon.it": "IT",
    "marketplace.amazon.es": "ES",
    "marketplace.amazon.nl": "NL",
    "marketplace.amazon.se": "SE",
    "marketplace.amazon.pl": "PL",
    "marketplace.amazon.com.be": "BE",
    "marketplace.amazon.ie": "IE",
    "marketplace.amazon.com.tr": "TR",
    "marketplace.amazon.ae": "AE",
    "marketplace.amazon.sa": "SA",
    "marketplace.amazon.eg": "EG",
    "marketplace.amazon.in": "IN",
    "marketplace.amazon.co.jp": "JP",
    "marketplace.amazon.com.au": "AU",
    "marketplace.amazon.sg": "SG",
}

_LOCAL_RE = re.compile(r"(?P<local>[a-z0-9]{1,64})(?:\+(?P<case>[a-z0-9-]{1,64}))?", re.ASCII)


@dataclass(frozen=True, slots=True)
class BuyerAddress:
    """A recognised buyer alias."""

    key: str  # local@domain, lower case, no +case: the blocklist key
    local: str
    domain: str
    marketplace: str  # two-letter marketplace code, e.g. "UK"
    case: str | None  # the +case suffix, if any (lower case)


def parse_buyer_address(
    address: str, extra_domains: frozenset[str] | set[str] = frozenset()
) -> BuyerAddress | None:
    """Return the buyer alias in ``address``, or None when it is not one.

    ``address`` may be a bare addr-spec or carry a display name and angle brackets. Look-alike
    domains (``marketplace.amazon.com.evil.example``) are not buyers: the domain must equal a
    known marketplace domain exactly.
    """
    if not isinstance(address, str) or len(address) > 512:
        return None
    candidate = address.strip()
    if "<" in candidate or '"' in candidate:
        pairs = getaddresses([candidate])
        if len(pairs) != 1:
            return None
        candidate = pairs[0][1]
    candidate = candidate.strip().lower()
    if candidate.count("@") != 1:
        return None
    local_part, domain = candidate.split("@")
    domain = domain.rstrip(".")
    if domain in MARKETPLACE_DOMAINS:
        marketplace = MARKETPLACE_DOMAINS[domain]
    elif domain in extra_domains:
        marketplace = domain.rsplit(".", 1)[-1].upper()
    else:
        return None
    match = _LOCAL_RE.fullmatch(local_part)
    if match is None:
        return None
    local = match["local"]
    return BuyerAddress(
        key=f"{local}@{domain}",
        local=local,
        domain=domain,
        marketplace=marketplace,
        case=match["case"],
    )


def buyer_key(address: str, extra_domains: frozenset[str] | set[str] = frozenset()) -> str | None:
    """The blocklist key for ``address``, or None when it is not a buyer alias."""
    parsed = parse_buyer_address(address, extra_domains)
    return parsed.key if parsed else None
