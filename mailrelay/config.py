"""The YAML config file, validated into one immutable, typed object.

Every problem in a file is reported at once, by key path (``smtp.listen[0]: port 70000 is out of
range 1-65535``), because an operator fixing a config one error per restart is an operator who
stops trusting the daemon. Unknown keys are errors: a typo must never silently turn a setting off.
Secrets come from files or the environment only, so a config file can be shared and logged.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = Path("/etc/mailrelay/config.yaml")
EX_CONFIG = 78

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` lists every one, each starting with its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: Any) -> float:
    """Seconds from ``30s``, ``5m``, ``1h``, ``5d`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 1h, 5d)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 1h, 5d)")
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if seconds < 0:
        raise ValueError(f"{value!r} must not be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``25MiB``, ``10MB``, ``512KiB`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use e.g. 25MiB)")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size (use e.g. 25MiB, 512KiB, 10MB)")
        size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()])
    if size < 0:
        raise ValueError(f"{value!r} must not be negative")
    return size


def _tls_mode(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as False; accept both spellings.
    if value is False or value is None:
        return "off"
    return value.lower() if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
TlsServerMode = Annotated[Literal["off", "starttls", "implicit"], BeforeValidator(_tls_mode)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenAddress(_Section):
    """One SMTP listener: ``host:port`` plus an optional TLS mode of its own."""

    host: str
    port: int = Field(ge=1, le=65535)
    tls: TlsServerMode | None = None  # None: use smtp.tls.mode

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: Any) -> Any:
    """``"127.0.0.1:2525"``, ``"[::1]:2525"`` or ``{address: ..., tls: ...}``."""
    if isinstance(value, dict):
        if "address" not in value:
            return value
        rest = {k: v for k, v in value.items() if k != "address"}
        return {**parse_listen(value["address"]), **rest}
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a listen address (use HOST:PORT)")
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{value!r} is not a listen address (use HOST:PORT)")
    host = host.strip("[]") or "127.0.0.1"
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return {"host": host, "port": port}


class SmtpTls(_Section):
    mode: TlsServerMode = "off"
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _files(self) -> SmtpTls:
        if self.mode != "off" and (self.cert is None or self.key is None):
            raise ValueError(f"tls mode {self.mode} needs both cert and key")
        for name in ("cert", "key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file {path} not found")
        return self


class SmtpAuth(_Section):
    required: bool = False
    users_file: Path | None = None
    enforce_sender: bool = True
    max_failures: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _users(self) -> SmtpAuth:
        if self.required and self.users_file is None:
            raise ValueError("auth.required needs users_file")
        return self


class SmtpServer(_Section):
    listen: list[Annotated[ListenAddress, BeforeValidator(parse_listen)]] = Field(
        default_factory=lambda: [ListenAddress(host="127.0.0.1", port=2525)], min_length=1
    )
    hostname: str | None = None  # None: the machine's FQDN, looked up once at start
    tls: SmtpTls = SmtpTls()
    auth: SmtpAuth = SmtpAuth()
    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=lambda: [
            ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")
        ]
    )
    max_message_size: Size = 25 * 1024 * 1024
    max_connections: int = Field(default=200, ge=1)
    max_recipients: int = Field(default=100, ge=1)
    command_limit: int = Field(default=100, ge=10)
    idle_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    bare_newline: Literal["reject", "normalize"] = "reject"

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_shorthand(cls, value: Any) -> Any:
        # `tls: off` / `tls: starttls` is shorthand for `tls: {mode: ...}`.
        return {"mode": value} if value is None or isinstance(value, str | bool) else value

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        networks = []
        for item in value:
            try:
                networks.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not a network (use e.g. 192.0.2.0/24)") from None
        return networks

    @model_validator(mode="after")
    def _not_open_relay(self) -> SmtpServer:
        if any(n.prefixlen == 0 for n in self.allowed_networks):
            raise ValueError("allowed_networks contains the whole internet: that is an open relay")
        if self.auth.required:
            return self
        for listener in self.listen:
            tls = listener.tls or self.tls.mode
            if not listener.is_loopback and tls == "off":
                raise ValueError(
                    f"listener {listener} is not on loopback and has neither TLS nor required "
                    "AUTH: that would be an open relay (set smtp.auth.required and smtp.tls)"
                )
        return self


class _SecretSource(_Section):
    password_file: Path | None = None
    password_env: str | None = None
    password: SecretStr | None = None  # never given in the file: loaded from the two above

    @model_validator(mode="before")
    @classmethod
    def _no_inline(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("inline password is not allowed: use password_file or password_env")
        return data

    @model_validator(mode="after")
    def _load(self) -> _SecretSource:
        secret: str | None = None
        if self.password_file is not None:
            try:
                secret = self.password_file.read_text().strip("\r\n")
            except OSError as exc:
                raise ValueError(
                    f"password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from None
        elif self.password_env is not None:
            secret = os.environ.get(self.password_env)
            if secret is None:
                raise ValueError(f"password_env: variable {self.password_env} is not set")
        if secret is not None:
            object.__setattr__(self, "password", SecretStr(secret))
        return self


class UpstreamSmtp(_SecretSource):
    host: str
    port: int = Field(default=587, ge=1, le=65535)
    tls: TlsServerMode = "starttls"
    username: str | None = None
    timeout: Duration = 120.0

    @model_validator(mode="after")
    def _auth(self) -> UpstreamSmtp:
        if self.username and self.password is None:
            raise ValueError("username needs password_file or password_env")
        return self


class Upstream(_Section):
    smtp: UpstreamSmtp | None = None
    maildir: Path | None = None

    @model_validator(mode="after")
    def _one(self) -> Upstream:
        if self.smtp is not None and self.maildir is not None:
            raise ValueError("set either smtp or maildir, not both")
        if self.smtp is None and self.maildir is None:
            object.__setattr__(self, "maildir", Path("outbox"))
        return self


class Queue(_Section):
    workers: int = Field(default=4, ge=1, le=256)
    retry_initial: Duration = 60.0
    retry_max: Duration = 3600.0
    lifetime: Duration = 5 * 86400.0
    bounce_to_sender: bool = False

    @model_validator(mode="after")
    def _order(self) -> Queue:
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must not be shorter than retry_initial")
        return self


class PolicyRule(_Section):
    name: str = Field(min_length=1)
    class_: Literal["critical", "non-critical"] = Field(alias="class")
    subject: str | None = None
    body: str | None = None
    header: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _patterns(self) -> PolicyRule:
        patterns = {"subject": self.subject, "body": self.body}
        patterns.update({f"header.{k}": v for k, v in self.header.items()})
        if not any(patterns.values()):
            raise ValueError("a rule needs at least one of subject, body, header")
        for key, pattern in patterns.items():
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{key}: bad regular expression: {exc}") from None
        return self


class Threading(_Section):
    add_token: bool = True
    quote_original: bool = True


class Policy(_Section):
    mode: Literal["enforce", "monitor"] = "enforce"
    on_drop: Literal["reject", "discard", "quarantine"] = "reject"
    default_class: Literal["critical", "non-critical"] = "non-critical"
    buyer_domains: list[str] = Field(default_factory=list)
    rules: list[PolicyRule] = Field(default_factory=list)
    threading: Threading = Threading()
    class_header: str = "X-Mailrelay-Class"

    @field_validator("buyer_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        for domain in value:
            if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", domain.lower()):
                raise ValueError(f"{domain!r} is not a domain name")
        return [d.lower() for d in value]


def _after_notice(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value in ("flag", "delete", "keep") or (value.startswith("move:") and len(value) > 5):
        return value
    raise ValueError(f"{value!r}: use move:FOLDER, flag, delete or keep")


class ImapAccount(_SecretSource):
    name: str = Field(min_length=1)
    host: str
    port: int = Field(default=993, ge=1, le=65535)
    tls: TlsServerMode = "implicit"
    username: str
    mailboxes: list[str] = Field(default_factory=lambda: ["INBOX"], min_length=1)
    idle: bool = True
    poll_interval: Duration = 60.0
    timeout: Duration = 30.0
    after_notice: Annotated[str, BeforeValidator(_after_notice)] = "move:Amazon/Opt-outs"

    @model_validator(mode="after")
    def _checks(self) -> ImapAccount:
        if self.password is None:
            raise ValueError("needs password_file or password_env")
        if self.tls == "starttls":
            raise ValueError("tls: starttls is not supported (aioimaplib has no STARTTLS); "
                             "use implicit (port 993)")
        if self.tls == "off" and not _is_loopback(self.host):
            raise ValueError("tls: off is only allowed for a server on loopback")
        return self


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Imap(_Section):
    accounts: list[ImapAccount] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Imap:
        names = [a.name for a in self.accounts]
        if len(names) != len(set(names)):
            raise ValueError("account names must be unique")
        return self


class Metrics(_Section):
    listen: Annotated[ListenAddress, BeforeValidator(parse_listen)] | None = None


class Log(_Section):
    format: Literal["json", "console", "auto"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Config(_Section):
    database: Path = Path("/var/lib/mailrelay/mailrelay.db")
    log: Log = Log()
    smtp: SmtpServer = SmtpServer()
    upstream: Upstream = Upstream()
    queue: Queue = Queue()
    policy: Policy = Policy()
    imap: Imap = Imap()
    metrics: Metrics = Metrics()
    shutdown_timeout: Duration = 30.0


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part).startswith(("function-", "literal[", "union[")) or part == "ListenAddress":
            continue  # pydantic's names for validator and union branches, not keys
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _message(error: Any) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


_SUBKEY_RE = re.compile(r"^([a-z_]+): (.+)$", re.DOTALL)


def format_errors(exc: ValidationError) -> list[str]:
    """One ``key.path: message`` line per problem, de-duplicated, in file order."""
    lines = []
    for error in exc.errors():
        path, message = _key_path(error["loc"]), _message(error)
        sub = _SUBKEY_RE.match(message)
        if sub:  # a validator that names the key it is about: fold it into the path
            path, message = f"{path}.{sub[1]}", sub[2]
        lines.append(f"{path}: {message}")
    return list(dict.fromkeys(lines))


def parse_config(data: Any) -> Config:
    """Validate already-loaded YAML data."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): the file must be a mapping of sections"])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None


def load_config(path: Path | str) -> Config:
    """Read and validate the YAML file at ``path``; raises ConfigError on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    return parse_config(data)


def resolve_config_path(given: str | None) -> Path:
    """``-c`` first, then ``$MAILRELAY_CONFIG``, then /etc/mailrelay/config.yaml."""
    if given:
        return Path(given)
    env = os.environ.get("MAILRELAY_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def effective_config(config: Config) -> dict[str, Any]:
    """The config as plain data for printing; secrets appear only as ``********``."""
    data = config.model_dump(mode="json", by_alias=True)

    def mask(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: ("********" if k == "password" and v is not None else mask(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [mask(v) for v in node]
        return node

    return mask(data)
