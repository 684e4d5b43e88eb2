"""Schema migrations, one list of statements per ``PRAGMA user_version``.

Each version is applied statement by statement inside one ``BEGIN IMMEDIATE`` transaction
(``executescript`` is not atomic), with the version bump last, so a failed migration leaves the
database exactly as it was.
"""

from __future__ import annotations

MIGRATIONS: list[list[str]] = [
    # version 1: the core tables
    [
        """CREATE TABLE blocklist (
            buyer_key   TEXT PRIMARY KEY,
            marketplace TEXT NOT NULL,
            source      TEXT NOT NULL,
            reason      TEXT NOT NULL DEFAULT '',
            evidence    TEXT NOT NULL DEFAULT '',
            first_seen  REAL NOT NULL,
            last_seen   REAL NOT NULL
        )""",
        """CREATE TABLE optout_orders (
            order_id          TEXT PRIMARY KEY,
            notice_message_id TEXT,
            received          REAL NOT NULL,
            buyer_key         TEXT,
            resolved_at       REAL
        )""",
        """CREATE TABLE buyer_messages (
            message_id    TEXT PRIMARY KEY,
            buyer_key     TEXT NOT NULL,
            buyer_address TEXT NOT NULL,
            order_id      TEXT,
            token         TEXT,
            subject       TEXT NOT NULL DEFAULT '',
            text          TEXT NOT NULL DEFAULT '',
            received      REAL NOT NULL
        )""",
        "CREATE INDEX buyer_messages_buyer ON buyer_messages(buyer_key, received)",
        "CREATE INDEX buyer_messages_order ON buyer_messages(order_id)",
        "CREATE INDEX buyer_messages_token ON buyer_messages(token)",
        """CREATE TABLE relayed (
            id         INTEGER PRIMARY KEY,
            message_id TEXT,
            buyer_key  TEXT NOT NULL,
            order_id   TEXT,
            queue_id   TEXT,
            relayed_at REAL NOT NULL
        )""",
        "CREATE INDEX relayed_order ON relayed(order_id)",
        "CREATE INDEX relayed_buyer ON relayed(buyer_key)",
        """CREATE TABLE queue (
            id           TEXT PRIMARY KEY,
            mail_from    TEXT NOT NULL,
            mail_options TEXT NOT NULL DEFAULT '[]',
            message_id   TEXT,
            size         INTEGER NOT NULL,
            raw          BLOB,
            state        TEXT NOT NULL,
            attempts     INTEGER NOT NULL DEFAULT 0,
            created      REAL NOT NULL,
            next_attempt REAL NOT NULL,
            last_error   TEXT,
            auth_user    TEXT,
            peer         TEXT
        )""",
        "CREATE INDEX queue_due ON queue(state, next_attempt)",
        """CREATE TABLE queue_rcpt (
            queue_id   TEXT NOT NULL REFERENCES queue(id) ON DELETE CASCADE,
            rcpt       TEXT NOT NULL,
            state      TEXT NOT NULL,
            buyer_key  TEXT,
            class      TEXT,
            last_error TEXT,
            updated    REAL NOT NULL,
            PRIMARY KEY (queue_id, rcpt)
        )""",
        "CREATE INDEX queue_rcpt_buyer ON queue_rcpt(buyer_key, state)",
        """CREATE TABLE audit (
            id         INTEGER PRIMARY KEY,
            at         REAL NOT NULL,
            queue_id   TEXT,
            message_id TEXT,
            recipient  TEXT,
            buyer_key  TEXT,
            class      TEXT,
            rule       TEXT,
            action     TEXT NOT NULL,
            mode       TEXT,
            reason     TEXT NOT NULL DEFAULT ''
        )""",
        """CREATE TABLE imap_state (
            account     TEXT NOT NULL,
            mailbox     TEXT NOT NULL,
            uidvalidity INTEGER NOT NULL,
            last_uid    INTEGER NOT NULL,
            last_pass   REAL,
            PRIMARY KEY (account, mailbox)
        )""",
    ],
    # version 2: audit look-ups by time and buyer; Message-IDs already handled per mailbox, so a
    # UIDVALIDITY change can rescan a mailbox without handling anything twice
    [
        "CREATE INDEX audit_at ON audit(at)",
        "CREATE INDEX audit_buyer ON audit(buyer_key, at)",
        """CREATE TABLE imap_handled (
            account    TEXT NOT NULL,
            mailbox    TEXT NOT NULL,
            message_id TEXT NOT NULL,
            kind       TEXT NOT NULL,
            handled_at REAL NOT NULL,
            PRIMARY KEY (account, mailbox, message_id)
        )""",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)
