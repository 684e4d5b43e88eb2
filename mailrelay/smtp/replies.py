"""Every SMTP reply mailrelay sends, named once; tests compare against these constants."""

from __future__ import annotations

from typing import NamedTuple


class Reply(NamedTuple):
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> str:
        return f"{self.code} {self.enhanced} {text}"


OK = Reply(250, "2.0.0", "OK")
QUEUED = Reply(250, "2.0.0", "Ok: queued as")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied: authenticate first")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not allowed for this user")
BAD_ADDRESS = Reply(553, "5.1.3", "Invalid address syntax")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
LOCAL_ERROR = Reply(451, "4.3.0", "Temporary local error")
STORE_FAILURE = Reply(451, "4.3.0", "Could not store the message, please try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
BARE_NEWLINE = Reply(550, "5.6.2", "Bare CR or LF in message data not allowed")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TOO_MANY = Reply(421, "4.7.0", "Too many failed authentication attempts")
