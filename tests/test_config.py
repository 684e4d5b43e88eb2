"""The config file: every mistake reported by key path, defaults, units, secrets, the CLI check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers_store import EXAMPLE_CONFIG, ROOT, cli_env, run_cli

from mailrelay.config import (
    EX_CONFIG,
    Config,
    ConfigError,
    effective_config,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    resolve_config_path,
)

SECRET = "s3cr3t-Pa55"


def problems(data: Any) -> list[str]:
    """The problem lines parse_config reports for ``data`` (fails if it is accepted)."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def imap_account(**overrides: Any) -> dict[str, Any]:
    account = {"name": "seller", "host": "imap.example.com", "username": "seller@example.com",
               "password_env": "MAILRELAY_TEST_IMAP_PW"}
    account.update(overrides)
    return account


@pytest.fixture(autouse=True)
def _imap_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILRELAY_TEST_IMAP_PW", SECRET)
    monkeypatch.delenv("MAILRELAY_TEST_UNSET", raising=False)


# --- every kind of error, each by its key path ------------------------------------------------

ERRORS = [
    ("listen port too high", {"smtp": {"listen": ["127.0.0.1:70000"]}},
     "smtp.listen[0]: port 70000 is out of range 1-65535"),
    ("listen port zero", {"smtp": {"listen": ["127.0.0.1:2525", "127.0.0.1:0"]}},
     "smtp.listen[1]: port 0 is out of range"),
    ("listen not host:port", {"smtp": {"listen": ["localhost"]}},
     "smtp.listen[0]: 'localhost' is not a listen address"),
    ("upstream port", {"upstream": {"smtp": {"host": "smtp.example.com", "port": 70000}}},
     "upstream.smtp.port:"),
    ("imap port", {"imap": {"accounts": [imap_account(port=0)]}}, "imap.accounts[0].port:"),
    ("metrics port", {"metrics": {"listen": "127.0.0.1:99999"}}, "metrics.listen: port 99999"),
    ("unknown top-level key", {"smpt": {}}, "smpt: unknown key"),
    ("unknown section key", {"smtp": {"listn": ["127.0.0.1:25"]}}, "smtp.listn: unknown key"),
    ("unknown nested key", {"smtp": {"tls": {"mode": "off", "crt": "x.pem"}}},
     "smtp.tls.crt: unknown key"),
    ("unknown key in list item", {"imap": {"accounts": [imap_account(idel=True)]}},
     "imap.accounts[0].idel: unknown key"),
    ("unknown key in rule", {"policy": {"rules": [
        {"name": "r", "class": "critical", "subject": "x", "sujbect": "y"}]}},
     "policy.rules[0].sujbect: unknown key"),
    ("bad duration", {"queue": {"retry_initial": "5 minutes"}},
     "queue.retry_initial: '5 minutes' is not a duration"),
    ("negative duration", {"smtp": {"idle_timeout": -1}}, "smtp.idle_timeout: -1 must not be"),
    ("boolean duration", {"shutdown_timeout": True}, "shutdown_timeout: True is not a duration"),
    ("bad size", {"smtp": {"max_message_size": "25 megs"}},
     "smtp.max_message_size: '25 megs' is not a size"),
    ("bad regex in subject", {"policy": {"rules": [
        {"name": "r", "class": "critical", "subject": "(unclosed"}]}},
     "policy.rules[0].subject: bad regular expression"),
    ("bad regex in body", {"policy": {"rules": [
        {"name": "ok", "class": "critical", "subject": "fine"},
        {"name": "r", "class": "non-critical", "body": "[a-"}]}},
     "policy.rules[1].body: bad regular expression"),
    ("bad regex in header", {"policy": {"rules": [
        {"name": "r", "class": "critical", "header": {"X-Reason": "*x"}}]}},
     "policy.rules[0]: header.X-Reason: bad regular expression"),
    ("rule without pattern", {"policy": {"rules": [{"name": "r", "class": "critical"}]}},
     "policy.rules[0]: a rule needs at least one of subject, body, header"),
    ("inline password", {"upstream": {"smtp": {
        "host": "smtp.example.com", "username": "u", "password": SECRET}}},
     "upstream.smtp: inline password is not allowed"),
    ("inline imap password", {"imap": {"accounts": [
        {"name": "a", "host": "imap.example.com", "username": "u", "password": SECRET}]}},
     "imap.accounts[0]: inline password is not allowed"),
    ("missing password_file", {"upstream": {"smtp": {
        "host": "smtp.example.com", "username": "u", "password_file": "/nonexistent/pw"}}},
     "upstream.smtp.password_file: cannot read /nonexistent/pw"),
    ("unset password_env", {"upstream": {"smtp": {
        "host": "smtp.example.com", "username": "u", "password_env": "MAILRELAY_TEST_UNSET"}}},
     "upstream.smtp.password_env: variable MAILRELAY_TEST_UNSET is not set"),
    ("username without password", {"upstream": {"smtp": {"host": "h", "username": "u"}}},
     "upstream.smtp: username needs password_file or password_env"),
    ("imap without password", {"imap": {"accounts": [
        {"name": "a", "host": "imap.example.com", "username": "u"}]}},
     "imap.accounts[0]: needs password_file or password_env"),
    ("imap starttls", {"imap": {"accounts": [imap_account(tls="starttls")]}},
     "imap.accounts[0].tls: starttls is not supported"),
    ("imap plaintext off loopback", {"imap": {"accounts": [imap_account(tls="off")]}},
     "imap.accounts[0].tls: off is only allowed for a server on loopback"),
    ("open relay: public listener, no auth, no tls", {"smtp": {"listen": ["0.0.0.0:25"]}},
     "smtp: listener 0.0.0.0:25 is not on loopback"),
    ("open relay: listener tls off overrides", {"smtp": {
        "listen": [{"address": "192.0.2.1:587", "tls": "off"}],
        "tls": {"mode": "starttls", "cert": __file__, "key": __file__}}},
     "smtp: listener 192.0.2.1:587 is not on loopback"),
    ("open relay: ipv6 listener", {"smtp": {"listen": ["[2001:db8::1]:25"]}},
     "smtp: listener [2001:db8::1]:25 is not on loopback"),
    ("allowed_networks 0.0.0.0/0", {"smtp": {"allowed_networks": ["0.0.0.0/0"]}},
     "smtp: allowed_networks contains the whole internet"),
    ("allowed_networks ::/0", {"smtp": {"allowed_networks": ["127.0.0.0/8", "::/0"]}},
     "smtp: allowed_networks contains the whole internet"),
    ("allowed_networks garbage", {"smtp": {"allowed_networks": ["10.0.0.0/33"]}},
     "smtp.allowed_networks: '10.0.0.0/33' is not a network"),
    ("tls without cert", {"smtp": {"tls": {"mode": "implicit"}}},
     "smtp.tls: tls mode implicit needs both cert and key"),
    ("tls cert missing", {"smtp": {"tls": {"mode": "starttls", "cert": "/nonexistent/c.pem",
                                           "key": __file__}}},
     "smtp.tls.cert: file /nonexistent/c.pem not found"),
    ("bad tls mode", {"smtp": {"tls": "sometimes"}}, "smtp.tls.mode:"),
    ("auth without users", {"smtp": {"auth": {"required": True}}},
     "smtp.auth: auth.required needs users_file"),
    ("smtp and maildir", {"upstream": {"smtp": {"host": "h"}, "maildir": "out"}},
     "upstream: set either smtp or maildir, not both"),
    ("retry order", {"queue": {"retry_initial": "2h", "retry_max": "1h"}},
     "queue: retry_max must not be shorter than retry_initial"),
    ("bad policy mode", {"policy": {"mode": "maybe"}}, "policy.mode:"),
    ("bad buyer domain", {"policy": {"buyer_domains": ["not a domain"]}},
     "policy.buyer_domains: 'not a domain' is not a domain name"),
    ("bad after_notice", {"imap": {"accounts": [imap_account(after_notice="burn")]}},
     "imap.accounts[0].after_notice: 'burn': use move:FOLDER"),
    ("duplicate imap names", {"imap": {"accounts": [imap_account(), imap_account()]}},
     "imap: account names must be unique"),
    ("missing required key", {"upstream": {"smtp": {"port": 25}}},
     "upstream.smtp.host: required key is missing"),
    ("section is not a mapping", {"smtp": "yes"}, "smtp:"),
]


@pytest.mark.parametrize(("data", "expected"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_each_mistake_is_reported_by_key_path(data: dict[str, Any], expected: str) -> None:
    """Every kind of mistake is refused with one line that starts with its key path."""
    found = problems(data)
    assert any(line.startswith(expected) for line in found), found


def test_inline_password_is_never_echoed() -> None:
    """A refused inline password does not appear in the error text."""
    found = problems({"upstream": {"smtp": {"host": "h", "username": "u", "password": SECRET}}})
    assert SECRET not in "\n".join(found)


@pytest.mark.parametrize("listen", [
    {"host": "127.0.0.1", "port": 70000},
    {"address": "127.0.0.1:2525", "port": 0},
])
def test_listen_mapping_form_checks_port(listen: dict[str, Any]) -> None:
    """A listener given as a mapping gets the same port range check as HOST:PORT."""
    found = problems({"smtp": {"listen": [listen]}})
    assert any(line.startswith("smtp.listen[0]") and "port" in line for line in found), found


def test_three_mistakes_are_listed_at_once() -> None:
    """A file with three mistakes in three sections reports all three, each by key path."""
    found = problems({
        "smtp": {"listen": ["127.0.0.1:70000"]},
        "queue": {"workers": 0},
        "log": {"level": "loud"},
    })
    assert len(found) == 3, found
    for key in ("smtp.listen[0]:", "queue.workers:", "log.level:"):
        assert sum(line.startswith(key) for line in found) == 1, (key, found)


def test_three_mistakes_in_one_section_are_listed_at_once() -> None:
    """Sibling mistakes in one section are not hidden behind the first."""
    found = problems({"smtp": {"max_message_size": "big", "idle_timeout": "soon", "typo": 1}})
    assert sorted(line.split(":")[0] for line in found) == [
        "smtp.idle_timeout", "smtp.max_message_size", "smtp.typo"]


# --- files: YAML problems, non-mappings, encodings --------------------------------------------

def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    """A YAML syntax error is reported with the line where it was found."""
    path = tmp_path / "c.yaml"
    path.write_text("log:\n  level: info\nsmtp:\n  listen: [\"127.0.0.1:2525\"\n"
                    "  hostname: x: y\nqueue: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [line] = info.value.problems
    assert line.startswith(f"{path}: not valid YAML (line 5,"), line


def test_yaml_bad_indentation_names_line(tmp_path: Path) -> None:
    """A mapping indented wrongly on line 3 is reported at line 3."""
    path = tmp_path / "c.yaml"
    path.write_text("log:\n  level: info\n   format: json\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "(line 3," in info.value.problems[0]


@pytest.mark.parametrize("text", ["- smtp\n- queue\n", "just a string\n", "42\n"])
def test_non_mapping_file_is_refused(tmp_path: Path, text: str) -> None:
    """A file whose top level is a list or a scalar is refused with a clear message."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["(top level): the file must be a mapping of sections"]


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    """A Latin-1 file is refused as not UTF-8 instead of raising UnicodeDecodeError."""
    path = tmp_path / "c.yaml"
    path.write_bytes("smtp:\n  hostname: relais-café.example\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: not UTF-8 text"]


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A config path that does not exist is one problem, not an OSError."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems[0].endswith("cannot read: No such file or directory")


# --- defaults --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    """An empty file is a valid config with every section at its default."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    assert config == Config()
    for section in ("log", "smtp", "upstream", "queue", "policy", "imap", "metrics"):
        assert getattr(config, section) is not None, section
    assert [str(a) for a in config.smtp.listen] == ["127.0.0.1:2525"]
    assert config.smtp.tls.mode == "off"
    assert config.smtp.max_message_size == 25 * 1024 * 1024
    assert config.upstream.maildir == Path("outbox") and config.upstream.smtp is None
    assert config.queue.lifetime == 5 * 86400
    assert config.policy.mode == "enforce" and config.policy.rules == []
    assert config.imap.accounts == [] and config.metrics.listen is None
    assert config.shutdown_timeout == 30
    assert {str(n) for n in config.smtp.allowed_networks} == {"127.0.0.0/8", "::1/128"}


def test_effective_config_has_every_section() -> None:
    """The printed effective config shows every section, even from an empty file."""
    data = effective_config(parse_config(None))
    assert set(data) == {"database", "log", "smtp", "upstream", "queue", "policy", "imap",
                         "metrics", "shutdown_timeout"}
    assert data["policy"]["rules"] == []


def test_config_is_immutable() -> None:
    """A loaded config cannot be changed by accident at run time."""
    config = parse_config({})
    with pytest.raises(Exception, match="frozen"):
        config.queue.workers = 9  # type: ignore[misc]


# --- units -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000), ("2w", 1209600), ("500ms", 0.5),
    ("1.5h", 5400), (" 10 s ", 10), ("90", 90), (90, 90), (2.5, 2.5), (0, 0),
])
def test_durations(text: Any, seconds: float) -> None:
    """Durations accept s/m/h/d/w/ms suffixes and plain numbers of seconds."""
    assert parse_duration(text) == seconds
    assert parse_config({"queue": {"lifetime": text}}).queue.lifetime == seconds


@pytest.mark.parametrize("text", ["5 minutes", "", "m", "5y", "-5s", -1, True, None, [5]])
def test_bad_durations(text: Any) -> None:
    """Anything that is not a duration is refused rather than guessed."""
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("25MiB", 25 * 1024**2), ("10MB", 10_000_000), ("512KiB", 512 * 1024), ("1GiB", 1024**3),
    ("2kb", 2000), ("100B", 100), ("10 MiB", 10 * 1024**2), ("1024", 1024), (1024, 1024),
])
def test_sizes(text: Any, size: int) -> None:
    """Sizes accept binary and decimal units and plain numbers of bytes."""
    assert parse_size(text) == size
    assert parse_config({"smtp": {"max_message_size": text}}).smtp.max_message_size == size


@pytest.mark.parametrize("text", ["25 megs", "MiB", "10XB", "", -1, True])
def test_bad_sizes(text: Any) -> None:
    """Anything that is not a size is refused."""
    with pytest.raises(ValueError, match=r"size|negative"):
        parse_size(text)


# --- YAML booleans and TLS modes -------------------------------------------------------------

def test_yaml_off_is_accepted_as_tls_off(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare `off` as False; every TLS setting takes it as mode off."""
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n", encoding="utf-8")
    path = tmp_path / "c.yaml"
    path.write_text(
        "smtp:\n  tls: off\n  listen:\n    - {address: '127.0.0.1:2525', tls: off}\n"
        "upstream:\n  smtp: {host: 127.0.0.1, port: 2526, tls: off}\n"
        "imap:\n  accounts:\n    - {name: a, host: 127.0.0.1, username: u, tls: off, "
        f"password_file: {pw}}}\n", encoding="utf-8")
    assert yaml.safe_load(path.read_text())["smtp"]["tls"] is False
    config = load_config(path)
    assert config.smtp.tls.mode == "off"
    assert config.smtp.listen[0].tls == "off"
    assert config.upstream.smtp is not None and config.upstream.smtp.tls == "off"
    assert config.imap.accounts[0].tls == "off"


def test_tls_mode_shorthand_and_case(tmp_path: Path) -> None:
    """`tls: STARTTLS` with cert and key is the same as `tls: {mode: starttls}`."""
    cert = tmp_path / "c.pem"
    cert.write_text("x", encoding="utf-8")
    config = parse_config({"smtp": {"tls": {"mode": "STARTTLS", "cert": str(cert),
                                            "key": str(cert)}}})
    assert config.smtp.tls.mode == "starttls"


def test_public_listener_with_tls_and_auth_is_accepted(tmp_path: Path) -> None:
    """A non-loopback listener is fine once AUTH is required (it is not an open relay)."""
    users = tmp_path / "users"
    users.write_text("", encoding="utf-8")
    config = parse_config({"smtp": {"listen": ["0.0.0.0:587"],
                                    "auth": {"required": True, "users_file": str(users)}}})
    assert config.smtp.listen[0].host == "0.0.0.0"


# --- secrets ---------------------------------------------------------------------------------

def test_secret_from_file(tmp_path: Path) -> None:
    """password_file is read, its trailing newline dropped; the value is masked when printed."""
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n", encoding="utf-8")
    config = parse_config({"upstream": {"smtp": {"host": "smtp.example.com", "username": "u",
                                                 "password_file": str(pw)}}})
    assert config.upstream.smtp is not None and config.upstream.smtp.password is not None
    assert config.upstream.smtp.password.get_secret_value() == SECRET
    assert SECRET not in repr(config)
    data = effective_config(config)
    assert data["upstream"]["smtp"]["password"] == "********"
    assert data["upstream"]["smtp"]["password_file"] == str(pw)
    assert SECRET not in json.dumps(data)


def test_secret_from_env() -> None:
    """password_env is read from the environment; effective_config masks it."""
    config = parse_config({"imap": {"accounts": [imap_account()]}})
    account = config.imap.accounts[0]
    assert account.password is not None and account.password.get_secret_value() == SECRET
    data = effective_config(config)
    assert data["imap"]["accounts"][0]["password"] == "********"
    assert SECRET not in json.dumps(data)


def test_no_secret_means_no_mask() -> None:
    """Without a password source the effective config says null, not a fake mask."""
    config = parse_config({"upstream": {"smtp": {"host": "smtp.example.com"}}})
    assert effective_config(config)["upstream"]["smtp"]["password"] is None


# --- the shipped example and the config path -------------------------------------------------

def test_example_config_validates() -> None:
    """config.example.yaml, as shipped, is a valid config for a local trial."""
    config = load_config(EXAMPLE_CONFIG)
    assert [str(a) for a in config.smtp.listen] == ["127.0.0.1:2525"]
    assert config.upstream.maildir == Path("outbox")
    assert config.database == Path("mailrelay.db")
    assert config.smtp.idle_timeout == 300 and config.smtp.data_timeout == 600


def test_example_config_shows_every_key() -> None:
    """Every key of every section appears in config.example.yaml (it documents the defaults)."""
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    data = effective_config(parse_config({}))
    for section, value in data.items():
        assert f"{section}:" in text, section
        if isinstance(value, dict):
            for key in value:
                assert f"{key}:" in text, f"{section}.{key}"


def test_resolve_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """-c wins over $MAILRELAY_CONFIG, which wins over /etc/mailrelay/config.yaml."""
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)
    assert resolve_config_path(None) == Path("/etc/mailrelay/config.yaml")
    monkeypatch.setenv("MAILRELAY_CONFIG", "/tmp/env.yaml")
    assert resolve_config_path(None) == Path("/tmp/env.yaml")
    assert resolve_config_path("given.yaml") == Path("given.yaml")


# --- `mailrelay check-config` ----------------------------------------------------------------

def test_check_config_example_exits_0(tmp_path: Path) -> None:
    """check-config on the example prints the effective config and exits 0."""
    result = run_cli("check-config", "-c", EXAMPLE_CONFIG, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "config ok" in result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["smtp"]["listen"][0]["port"] == 2525


def test_check_config_json_masks_secrets(tmp_path: Path) -> None:
    """check-config --json masks a password read from the environment."""
    path = tmp_path / "c.yaml"
    path.write_text("imap:\n  accounts:\n    - {name: a, host: imap.example.com, username: u, "
                    "password_env: MAILRELAY_TEST_IMAP_PW}\n", encoding="utf-8")
    result = run_cli("check-config", "--json", "-c", path, cwd=tmp_path,
                     env=cli_env(MAILRELAY_TEST_IMAP_PW=SECRET))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["imap"]["accounts"][0]["password"] == "********"
    assert SECRET not in result.stdout + result.stderr


def test_check_config_uses_env_path(tmp_path: Path) -> None:
    """Without -c, check-config reads $MAILRELAY_CONFIG."""
    result = run_cli("check-config", cwd=tmp_path,
                     env=cli_env(MAILRELAY_CONFIG=str(EXAMPLE_CONFIG)))
    assert result.returncode == 0, result.stderr


BROKEN = """\
smtp:
  listen: ["127.0.0.1:70000"]
  max_message_size: lots
  tls: {mode: off, crt: x}
queue:
  retry_initial: soon
policy:
  rules:
    - {name: r, class: critical, subject: "(unclosed"}
upstream:
  smtp: {host: smtp.example.com, username: u, password: hunter2}
"""


def test_check_config_broken_file_lists_everything(tmp_path: Path) -> None:
    """A broken file exits 78 with every problem on its own line and no traceback."""
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN, encoding="utf-8")
    result = run_cli("check-config", "-c", path, cwd=tmp_path)
    assert result.returncode == EX_CONFIG == 78
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for key in ("smtp.listen[0]:", "smtp.max_message_size:", "smtp.tls.crt: unknown key",
                "queue.retry_initial:", "policy.rules[0].subject:",
                "upstream.smtp: inline password"):
        assert f"\n  {key}" in result.stderr, (key, result.stderr)
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize(("content", "expected"), [
    (b"smtp: [unclosed\n", "not valid YAML (line 2"),
    (b"- a list\n", "(top level): the file must be a mapping"),
    (b"log: {level: caf\xe9}\n", "not UTF-8 text"),
])
def test_check_config_unreadable_files_exit_78(tmp_path: Path, content: bytes,
                                               expected: str) -> None:
    """Syntax errors, non-mappings and non-UTF-8 files exit 78 with one clear line."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    result = run_cli("check-config", "-c", path, cwd=tmp_path)
    assert result.returncode == 78
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_check_config_missing_file_exits_78(tmp_path: Path) -> None:
    """A -c path that does not exist is a config error, not a traceback."""
    result = run_cli("check-config", "-c", tmp_path / "nope.yaml", cwd=tmp_path)
    assert result.returncode == 78
    assert "No such file or directory" in result.stderr and "Traceback" not in result.stderr


def test_project_root_is_importable() -> None:
    """Sanity: the helper runs the CLI from this checkout."""
    assert (ROOT / "mailrelay" / "__main__.py").is_file()
