"""Allow ``python -m mailrelay``."""

from mailrelay.cli import main

raise SystemExit(main())
