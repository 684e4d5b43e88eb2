"""`mailrelay blocklist` end to end on real config and database files.

The round trip, exit codes and the environment variable run the real command in a subprocess;
the many table-driven variations call the same ``main()`` in-process to stay fast.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from helpers_store import blocklist_keys, buyer, cli_env, run_cli, run_cli_here, write_config

from mailrelay.cli.blocklist import EXPORT_COLUMNS
from mailrelay.store.schema import SCHEMA_VERSION

A = "qw2smy2gutcr61k"
B = "6bmcx2l1t7cwrwb"
C = "mnqxldr5q311j1g"
CASE = "3f1c2a4e-9b7d-4c1e-8f2a-1b2c3d4e5f60"


class Env:
    """One working directory with a config and a database, and a way to run the CLI there."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.db = tmp_path / "data" / "mailrelay.db"
        self.config = write_config(tmp_path, self.db,
                                   "policy:\n  buyer_domains: [buyers.shop.test]\n")

    def run(self, *args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``mailrelay blocklist ARGS -c CONFIG``, in-process."""
        return run_cli_here("blocklist", *args, "-c", self.config, stdin=stdin)

    def sub(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """``mailrelay blocklist ARGS -c CONFIG`` as a real child process."""
        return run_cli("blocklist", *args, "-c", self.config, cwd=self.dir)

    def ok(self, *args: str | Path, stdin: str | None = None, real: bool = False) -> str:
        result = self.sub(*args) if real else self.run(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def listed(self) -> list[dict[str, str]]:
        return json.loads(self.ok("list", "--json"))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)
    return Env(tmp_path)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed with exit 1 and exactly one line on stderr, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailrelay: ")
    return lines[0]


def test_add_normalises_keys(env: Env) -> None:
    """+case and upper-case forms of one buyer are stored once, under local@domain."""
    out = env.ok("add", f"{A}+{CASE}@marketplace.amazon.de", f"{A.upper()}@MARKETPLACE.AMAZON.DE",
                 f'"Jane - Amazon Marketplace" <{B}@marketplace.amazon.co.uk>',
                 "--reason", "asked by phone")
    assert "blocked 2 new buyer(s)" in out
    assert blocklist_keys(env.db) == sorted([f"{A}@marketplace.amazon.de",
                                             f"{B}@marketplace.amazon.co.uk"])
    entries = {e["buyer_key"]: e for e in env.listed()}
    assert entries[f"{A}@marketplace.amazon.de"]["marketplace"] == "DE"
    assert entries[f"{B}@marketplace.amazon.co.uk"]["marketplace"] == "UK"
    assert {e["source"] for e in entries.values()} == {"manual"}
    assert {e["reason"] for e in entries.values()} == {"asked by phone"}


def test_add_twice_is_idempotent(env: Env) -> None:
    """Adding a blocked buyer again says so and keeps one entry."""
    env.ok("add", f"{A}@marketplace.amazon.com")
    out = env.ok("add", f"{A}+other@marketplace.amazon.com")
    assert "blocked 0 new buyer(s), 1 already blocked" in out
    assert len(env.listed()) == 1


def test_add_uses_configured_extra_domains(env: Env) -> None:
    """A domain from policy.buyer_domains is accepted by the CLI too."""
    env.ok("add", "Buyer1+X@Buyers.Shop.Test")
    assert blocklist_keys(env.db) == ["buyer1@buyers.shop.test"]


@pytest.mark.parametrize("address", ["x@amazon.com", "x@marketplace.amazon.com.evil.example",
                                     "not an address"])
def test_add_refuses_non_buyers(env: Env, address: str) -> None:
    """A non-buyer address is refused with one line naming it; nothing is written."""
    line = one_line_error(env.run("add", f"{A}@marketplace.amazon.com", address))
    assert repr(address) in line and "not a marketplace buyer address" in line
    assert not env.db.exists() or blocklist_keys(env.db) == []


def test_list_table(env: Env) -> None:
    """`list` prints an aligned table with a header and a count."""
    assert env.ok("list").strip() == "0 buyer(s) blocked"
    env.ok("add", f"{A}@marketplace.amazon.com", f"{B}@marketplace.amazon.co.jp")
    lines = env.ok("list").splitlines()
    assert lines[0].split() == EXPORT_COLUMNS
    assert {line.split()[0] for line in lines[1:3]} == {f"{A}@marketplace.amazon.com",
                                                        f"{B}@marketplace.amazon.co.jp"}
    assert lines[-1] == "2 buyer(s) blocked"
    column = lines[0].index("marketplace")  # every row's marketplace sits under its header
    assert sorted(line[column:column + 2] for line in lines[1:3]) == ["JP", "US"]


def test_list_json_and_csv(env: Env) -> None:
    """`list --json` and `list --csv` give machine-readable copies of the same entries."""
    env.ok("add", f"{A}@marketplace.amazon.fr")
    [entry] = env.listed()
    assert entry["buyer_key"] == f"{A}@marketplace.amazon.fr"
    assert entry["marketplace"] == "FR"
    assert entry["first_seen"].endswith("Z")
    rows = list(csv.DictReader(io.StringIO(env.ok("list", "--csv"))))
    assert [r["buyer_key"] for r in rows] == [entry["buyer_key"]]


def test_round_trip_export_remove_import(env: Env) -> None:
    """Export to a CSV file, remove everyone, import the file: the same buyers are blocked."""
    env.ok("add", f"{A}@marketplace.amazon.com", f"{B}+{CASE}@marketplace.amazon.co.uk",
           f"{C}@MARKETPLACE.AMAZON.COM.AU", "buyer2@buyers.shop.test",
           "--reason", 'said "stop", twice', real=True)
    original = env.listed()
    assert len(original) == 4

    export = env.dir / "backup" / "blocklist.csv"
    export.parent.mkdir()
    assert env.ok("export", export, real=True) == ""
    rows = list(csv.reader(io.StringIO(export.read_text(encoding="utf-8"))))
    assert rows[0] == EXPORT_COLUMNS
    assert sorted(r[0] for r in rows[1:]) == sorted(e["buyer_key"] for e in original)
    assert {r[3] for r in rows[1:]} == {'said "stop", twice'}

    out = env.ok("remove", *[e["buyer_key"] for e in original], real=True)
    assert "removed 4 buyer(s)" in out
    assert blocklist_keys(env.db) == []

    assert "blocked 4 new buyer(s)" in env.ok("import", export, real=True)
    restored = env.listed()
    assert sorted((e["buyer_key"], e["marketplace"]) for e in restored) == sorted(
        (e["buyer_key"], e["marketplace"]) for e in original)
    assert {e["source"] for e in restored} == {"import"}


def test_export_to_stdout_and_json(env: Env) -> None:
    """`export` without a file writes CSV to stdout; `--json` writes JSON."""
    env.ok("add", f"{A}@marketplace.amazon.com")
    assert env.ok("export").splitlines()[0] == ",".join(EXPORT_COLUMNS)
    path = env.dir / "out.json"
    env.ok("export", "--json", path)
    assert [e["buyer_key"] for e in json.loads(path.read_text())] == [
        f"{A}@marketplace.amazon.com"]


def test_import_one_per_line(env: Env) -> None:
    """A plain list (comments, blank lines, +case, upper case, display names) is imported."""
    path = env.dir / "list.txt"
    path.write_text(
        "# buyers who asked us to stop\n\n"
        f"{A}@marketplace.amazon.com\n"
        f"  {B.upper()}+{CASE}@MARKETPLACE.AMAZON.DE  \n"
        f"Jane Doe <{C}@marketplace.amazon.it>\n"
        f"{A}+again@marketplace.amazon.com\n", encoding="utf-8")
    out = env.ok("import", path, "--reason", "old list")
    assert "blocked 3 new buyer(s)" in out
    assert blocklist_keys(env.db) == sorted([f"{A}@marketplace.amazon.com",
                                             f"{B}@marketplace.amazon.de",
                                             f"{C}@marketplace.amazon.it"])
    assert {e["reason"] for e in env.listed()} == {"old list"}


def test_import_csv_with_address_column(env: Env) -> None:
    """A CSV from another tool is imported from its `address` column, wherever it is."""
    path = env.dir / "tool.csv"
    path.write_text(
        "order_id,Address,name\n"
        f"403-4565603-0457311,{A}@marketplace.amazon.com,\"Doe, Jane\"\n"
        f"171-1234567-7654321,{B}+{CASE}@marketplace.amazon.es,Bob\n", encoding="utf-8")
    env.ok("import", path)
    assert blocklist_keys(env.db) == [f"{B}@marketplace.amazon.es", f"{A}@marketplace.amazon.com"]


def test_import_from_stdin(env: Env) -> None:
    """`import -` reads the list from standard input."""
    env.ok("import", "-", stdin=f"{A}@marketplace.amazon.sg\n")
    assert blocklist_keys(env.db) == [f"{A}@marketplace.amazon.sg"]


def test_import_bad_lines_imports_nothing(env: Env) -> None:
    """Bad lines are reported with their line numbers; nothing is imported; exit 1."""
    path = env.dir / "list.txt"
    path.write_text(
        f"# header comment\n{A}@marketplace.amazon.com\nnot-an-address\n\n"
        f"x@amazon.com\n{B}@marketplace.amazon.com\n", encoding="utf-8")
    result = env.run("import", path)
    assert result.returncode == 1
    assert f"{path}: line 3: 'not-an-address' is not a marketplace buyer address" in result.stderr
    assert f"{path}: line 5: 'x@amazon.com' is not a marketplace buyer address" in result.stderr
    assert "2 bad line(s)" in result.stderr and "nothing imported" in result.stderr
    assert "Traceback" not in result.stderr
    assert not env.db.exists() or blocklist_keys(env.db) == []


def test_import_bad_csv_lines_are_numbered(env: Env) -> None:
    """In a CSV file the line numbers count the header too."""
    path = env.dir / "tool.csv"
    path.write_text(f"address,note\n{A}@marketplace.amazon.com,ok\nbogus@example.com,bad\n",
                    encoding="utf-8")
    result = env.run("import", path)
    assert result.returncode == 1
    assert "line 3: 'bogus@example.com'" in result.stderr


def test_import_skip_invalid(env: Env) -> None:
    """--skip-invalid imports the good lines and still reports the bad ones."""
    path = env.dir / "list.txt"
    path.write_text(f"{A}@marketplace.amazon.com\nnope\n{B}@marketplace.amazon.ca\n",
                    encoding="utf-8")
    result = env.run("import", path, "--skip-invalid")
    assert result.returncode == 0, result.stderr
    assert "line 2: 'nope'" in result.stderr
    assert blocklist_keys(env.db) == [f"{B}@marketplace.amazon.ca", f"{A}@marketplace.amazon.com"]


def test_import_csv_without_address_column(env: Env) -> None:
    """A CSV whose header names no address column is refused as a whole."""
    path = env.dir / "tool.csv"
    path.write_text(f"order,who\n1,{A}@marketplace.amazon.com\n", encoding="utf-8")
    result = env.run("import", path)
    assert result.returncode == 1
    assert "line 1: CSV header has no address column" in result.stderr


def test_import_missing_file(env: Env) -> None:
    """Importing a file that does not exist is one line on stderr and exit 1."""
    line = one_line_error(env.sub("import", env.dir / "nope.txt"))
    assert "cannot read" in line and "nope.txt" in line


def test_remove_unknown_buyer(env: Env) -> None:
    """Removing a buyer who is not blocked says who, and exits 1."""
    env.ok("add", f"{A}@marketplace.amazon.com")
    result = env.run("remove", f"{A}@marketplace.amazon.com", f"{B}@marketplace.amazon.com")
    assert result.returncode == 1
    assert "removed 1 buyer(s)" in result.stdout
    assert f"not on the blocklist: {B}@marketplace.amazon.com" in result.stderr
    assert blocklist_keys(env.db) == []


@pytest.mark.parametrize("where", ["before action", "after action"])
def test_config_option_position(env: Env, where: str) -> None:
    """-c works both before and after the blocklist action."""
    args = (["blocklist", "-c", env.config, "add", f"{A}@marketplace.amazon.com"]
            if where == "before action"
            else ["blocklist", "add", f"{A}@marketplace.amazon.com", "-c", env.config])
    result = run_cli_here(*args)
    assert result.returncode == 0, result.stderr
    assert blocklist_keys(env.db) == [f"{A}@marketplace.amazon.com"]


def test_config_from_environment(env: Env) -> None:
    """Without -c, $MAILRELAY_CONFIG names the config (and so the database)."""
    other = env.dir / "elsewhere"
    other.mkdir()
    result = run_cli("blocklist", "add", f"{A}@marketplace.amazon.com", cwd=other,
                     env=cli_env(MAILRELAY_CONFIG=str(env.config)))
    assert result.returncode == 0, result.stderr
    assert blocklist_keys(env.db) == [f"{A}@marketplace.amazon.com"]


def test_option_beats_environment(env: Env, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """-c wins over $MAILRELAY_CONFIG."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("smpt: {}\n", encoding="utf-8")
    monkeypatch.setenv("MAILRELAY_CONFIG", str(broken))
    assert env.run("list").returncode == 0
    assert run_cli_here("blocklist", "list").returncode == 78


def test_bad_config_exits_78(env: Env) -> None:
    """A broken config stops every command with exit 78 and the problem by key path."""
    env.config.write_text("database: x.db\nsmpt: {}\n", encoding="utf-8")
    result = env.run("list")
    assert result.returncode == 78
    assert "smpt: unknown key" in result.stderr and "Traceback" not in result.stderr


def test_blocklist_without_action_is_usage_error(env: Env) -> None:
    """`mailrelay blocklist` alone is a usage error (exit 2) that shows the actions."""
    result = run_cli_here("blocklist", "-c", env.config)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr and "add" in result.stderr


def test_unknown_action_is_usage_error(env: Env) -> None:
    """An unknown action is a usage error (exit 2)."""
    assert env.run("purge").returncode == 2


def test_newer_database_is_one_line_error(env: Env) -> None:
    """A database from a newer mailrelay is refused with one line (exit 1), untouched."""
    env.ok("add", f"{A}@marketplace.amazon.com")
    with contextlib.closing(sqlite3.connect(env.db)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    line = one_line_error(env.run("add", f"{B}@marketplace.amazon.com"))
    assert "upgrade mailrelay" in line
    assert blocklist_keys(env.db) == [f"{A}@marketplace.amazon.com"]


def test_corrupt_database_is_one_line_error(env: Env) -> None:
    """A database file that is not SQLite is reported in one line and the CLI exits 1."""
    env.db.parent.mkdir(parents=True)
    env.db.write_bytes(b"definitely not sqlite\n" * 300)
    result = run_cli("blocklist", "list", "-c", env.config, cwd=env.dir, timeout=5)
    line = one_line_error(result)
    assert "not a database" in line


def test_many_buyers(env: Env) -> None:
    """A 2000-line import lands in one go and is listed completely."""
    path = env.dir / "big.txt"
    path.write_text("\n".join(buyer(n) for n in range(2000)) + "\n", encoding="utf-8")
    assert "blocked 2000 new buyer(s)" in env.ok("import", path)
    assert len(env.listed()) == 2000
