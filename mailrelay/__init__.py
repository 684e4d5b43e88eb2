"""mailrelay: an SMTP relay that keeps Amazon sellers' mail away from opted-out buyers."""

__version__ = "0.1.0"
