"""Buyer alias recognition: the 22 marketplaces, +case suffixes, display names, look-alikes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.policy.addresses import MARKETPLACE_DOMAINS, buyer_key, parse_buyer_address

LOCAL = "qw2smy2gutcr61k"
CASE_UUID = "3f1c2a4e-9b7d-4c1e-8f2a-1b2c3d4e5f60"

#: (domain, marketplace code) for every marketplace with MX records (amazon.md section 1.2).
EXPECTED_DOMAINS = {
    "marketplace.amazon.com": "US", "marketplace.amazon.ca": "CA",
    "marketplace.amazon.com.mx": "MX", "marketplace.amazon.com.br": "BR",
    "marketplace.amazon.co.uk": "UK", "marketplace.amazon.de": "DE",
    "marketplace.amazon.fr": "FR", "marketplace.amazon.it": "IT",
    "marketplace.amazon.es": "ES", "marketplace.amazon.nl": "NL",
    "marketplace.amazon.se": "SE", "marketplace.amazon.pl": "PL",
    "marketplace.amazon.com.be": "BE", "marketplace.amazon.ie": "IE",
    "marketplace.amazon.com.tr": "TR", "marketplace.amazon.ae": "AE",
    "marketplace.amazon.sa": "SA", "marketplace.amazon.eg": "EG",
    "marketplace.amazon.in": "IN", "marketplace.amazon.co.jp": "JP",
    "marketplace.amazon.com.au": "AU", "marketplace.amazon.sg": "SG",
}


def test_the_22_marketplace_domains() -> None:
    """Exactly the 22 documented marketplace domains are built in, with their codes."""
    assert len(MARKETPLACE_DOMAINS) == 22
    assert MARKETPLACE_DOMAINS == EXPECTED_DOMAINS


@pytest.mark.parametrize(("domain", "code"), sorted(EXPECTED_DOMAINS.items()))
def test_every_marketplace_domain_is_a_buyer(domain: str, code: str) -> None:
    """A plain alias on each marketplace domain is recognised with its marketplace code."""
    parsed = parse_buyer_address(f"{LOCAL}@{domain}")
    assert parsed is not None
    assert (parsed.key, parsed.local, parsed.domain, parsed.marketplace, parsed.case) == (
        f"{LOCAL}@{domain}", LOCAL, domain, code, None)


@pytest.mark.parametrize("domain", sorted(EXPECTED_DOMAINS))
def test_every_marketplace_domain_with_case_suffix(domain: str) -> None:
    """The newer ``local+<case-uuid>`` form keys to the same buyer as the plain alias."""
    parsed = parse_buyer_address(f"{LOCAL}+{CASE_UUID}@{domain}")
    assert parsed is not None
    assert parsed.key == f"{LOCAL}@{domain}"
    assert parsed.case == CASE_UUID


@pytest.mark.parametrize(("address", "key", "case"), [
    (f"{LOCAL}@marketplace.amazon.com", f"{LOCAL}@marketplace.amazon.com", None),
    (f"{LOCAL.upper()}@MARKETPLACE.AMAZON.CO.UK", f"{LOCAL}@marketplace.amazon.co.uk", None),
    (f"{LOCAL}@MarketPlace.Amazon.De", f"{LOCAL}@marketplace.amazon.de", None),
    (f"{LOCAL}+{CASE_UUID.upper()}@marketplace.amazon.fr", f"{LOCAL}@marketplace.amazon.fr",
     CASE_UUID),
    (f"{LOCAL}+12345@marketplace.amazon.co.jp", f"{LOCAL}@marketplace.amazon.co.jp", "12345"),
    (f'"Jane - Amazon Marketplace" <{LOCAL}@marketplace.amazon.de>',
     f"{LOCAL}@marketplace.amazon.de", None),
    (f'"Jane - Amazon Marketplace" <{LOCAL}+{CASE_UUID}@marketplace.amazon.de>',
     f"{LOCAL}@marketplace.amazon.de", CASE_UUID),
    (f"Jane Doe <{LOCAL}@marketplace.amazon.com>", f"{LOCAL}@marketplace.amazon.com", None),
    (f"<{LOCAL}@marketplace.amazon.com>", f"{LOCAL}@marketplace.amazon.com", None),
    (f"  {LOCAL}@marketplace.amazon.com\r\n", f"{LOCAL}@marketplace.amazon.com", None),
    (f"{LOCAL}@marketplace.amazon.com.", f"{LOCAL}@marketplace.amazon.com", None),
    ("x@marketplace.amazon.de", "x@marketplace.amazon.de", None),
])
def test_key_normalisation(address: str, key: str, case: str | None) -> None:
    """Case, +case suffix, display name, brackets, spaces and a root dot all key to local@domain."""
    parsed = parse_buyer_address(address)
    assert parsed is not None, address
    assert parsed.key == key
    assert parsed.case == case
    assert buyer_key(address) == key


def test_all_forms_of_one_buyer_share_one_key() -> None:
    """Every way one buyer's address can be written yields the same blocklist key."""
    forms = [
        f"{LOCAL}@marketplace.amazon.com",
        f"{LOCAL.upper()}@marketplace.amazon.com",
        f"{LOCAL}+{CASE_UUID}@marketplace.amazon.com",
        f"{LOCAL}+other-case-1@MARKETPLACE.amazon.com",
        f'"Jane - Amazon Marketplace" <{LOCAL}+{CASE_UUID}@marketplace.amazon.com>',
    ]
    assert {buyer_key(f) for f in forms} == {f"{LOCAL}@marketplace.amazon.com"}


@pytest.mark.parametrize("address", [
    "x@marketplace.amazon.com.evil.example",
    "x@marketplace-amazon.com",
    "x@amazon.com",
    "x@marketplace.amazon.cn",
    "x@evil.marketplace.amazon.com",
    "x@marketplace.amazon.co",
    "x@marketplace.amazon",
    "x@marketplaceamazon.com",
    "x@marketplace.amazon.com.",  # control: this one IS a buyer (root dot)
    "x@xmarketplace.amazon.com",
    "x@marketplace.amazon.com@evil.example",
    "Jane <x@marketplace.amazon.com.evil.example>",
    '"x@marketplace.amazon.com" <y@evil.example>',
    "y@evil.example (x@marketplace.amazon.com)",
    '"x@marketplace.amazon.com"@evil.example',
])
def test_look_alikes_are_not_buyers(address: str) -> None:
    """Only an exact marketplace domain is a buyer; look-alikes and hidden aliases are not."""
    expected = "x@marketplace.amazon.com" if address == "x@marketplace.amazon.com." else None
    assert buyer_key(address) == expected


@pytest.mark.parametrize("address", [
    "", " ", "no-at-sign", "@marketplace.amazon.com", "x@", "a@b@marketplace.amazon.com",
    "x.y@marketplace.amazon.com", "x_y@marketplace.amazon.com", "x+@marketplace.amazon.com",
    "+case@marketplace.amazon.com", "x+a+b@marketplace.amazon.com",
    "x+under_score@marketplace.amazon.com", "x@ marketplace.amazon.com",
    "jäne@marketplace.amazon.com", "x" * 65 + "@marketplace.amazon.com",
    "x" * 100_000 + "@marketplace.amazon.com", "@" * 10_000,
    "a <x@marketplace.amazon.com>, b <y@marketplace.amazon.com>",
    "<>", '"', "<<x@marketplace.amazon.com>>",
])
def test_garbage_strings_are_not_buyers(address: str) -> None:
    """Malformed, oversized and multi-address strings are rejected, never raising."""
    assert parse_buyer_address(address) is None
    assert buyer_key(address) is None


@pytest.mark.parametrize("value", [
    None, 42, 4.2, b"x@marketplace.amazon.com", ["x@marketplace.amazon.com"],
    {"x@marketplace.amazon.com"}, object(),
])
def test_non_strings_are_not_buyers(value: Any) -> None:
    """A non-str value (bytes, None, a list) is not a buyer, and does not raise."""
    assert parse_buyer_address(value) is None
    assert buyer_key(value) is None


def test_huge_display_name_is_bounded() -> None:
    """A pathologically long header value is refused quickly rather than parsed."""
    assert parse_buyer_address('"' + "J" * 1_000_000 + '" <x@marketplace.amazon.com>') is None


def test_extra_domains() -> None:
    """Configured extra buyer domains are recognised; others stay unknown."""
    extra = frozenset({"marketplace.example-shop.test"})
    parsed = parse_buyer_address("AbC123+Case-9@Marketplace.Example-Shop.Test", extra)
    assert parsed is not None
    assert parsed.key == "abc123@marketplace.example-shop.test"
    assert parsed.case == "case-9"
    assert buyer_key("abc123@marketplace.example-shop.test") is None
    assert buyer_key("abc123@evil.marketplace.example-shop.test", extra) is None
    # The built-in domains still work next to extra ones.
    assert buyer_key(f"{LOCAL}@marketplace.amazon.sg", extra) == f"{LOCAL}@marketplace.amazon.sg"


def test_extra_domains_accept_a_plain_set() -> None:
    """extra_domains may be an ordinary set (as built from the config)."""
    assert buyer_key("x@buyers.test", {"buyers.test"}) == "x@buyers.test"


def test_buyer_address_is_immutable() -> None:
    """Parsed addresses are frozen values that can be used as dict keys."""
    parsed = parse_buyer_address(f"{LOCAL}@marketplace.amazon.com")
    assert parsed is not None
    with pytest.raises(AttributeError):
        parsed.key = "other"  # type: ignore[misc]
    assert {parsed: 1}[parse_buyer_address(f"{LOCAL}@marketplace.amazon.com")] == 1


@given(st.text(max_size=300))
def test_never_raises_on_any_text(text: str) -> None:
    """Arbitrary text never raises, and whatever is accepted has a normalised key."""
    parsed = parse_buyer_address(text)
    if parsed is not None:
        assert parsed.key == parsed.key.lower()
        assert parsed.domain in MARKETPLACE_DOMAINS
        assert "+" not in parsed.key
        assert parsed.key == f"{parsed.local}@{parsed.domain}"


@given(local=st.from_regex(r"[a-z0-9]{1,64}", fullmatch=True),
       case=st.none() | st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True),
       domain=st.sampled_from(sorted(EXPECTED_DOMAINS)),
       upper=st.booleans())
def test_any_valid_alias_round_trips(local: str, case: str | None, domain: str,
                                     upper: bool) -> None:
    """Any alias of the documented shape keys to local@domain, whatever its case and suffix."""
    address = f"{local}+{case}@{domain}" if case else f"{local}@{domain}"
    if upper:
        address = address.upper()
    parsed = parse_buyer_address(address)
    assert parsed is not None
    assert parsed.key == f"{local}@{domain}"
    assert parsed.case == case
    assert parsed.marketplace == EXPECTED_DOMAINS[domain]
