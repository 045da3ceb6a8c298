"""API keys in the store (SQLite and PostgreSQL) and the key CLI."""

import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from serve_app.accounts import keys_cli as keys
from serve_app.accounts.keys import InvalidKeySettings, KeyStore, hash_key, verify
from serve_app.accounts.store import api_keys, connect
from serve_app.accounts.store import database_url as resolve_url


@pytest.fixture
def store(database_url):
    store = KeyStore(connect(database_url))
    with store.engine.begin() as connection:  # the PostgreSQL server is shared by the session
        connection.execute(api_keys.delete())
    return store


def test_key_lifecycle(store):
    key, secret = store.create("acme", requests_per_minute=60, tokens_per_minute=10_000)
    assert secret.startswith(f"q3s_{key.id}_") and len(secret) > 40
    assert verify(secret, store.active_by_hash()).id == key.id
    assert verify(secret + "x", store.active_by_hash()) is None
    admin, _ = store.create("ops", admin=True)
    assert [k.name for k in store.list()] == ["acme", "ops"] and store.list()[1].admin
    assert store.revoke(key.id) and not store.revoke(key.id)  # revoking twice changes nothing
    assert verify(secret, store.active_by_hash()) is None
    assert [k.id for k in store.list(include_revoked=False)] == [admin.id]


def test_only_the_hash_is_stored(store):
    key, secret = store.create("acme")
    with store.engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(select(api_keys))]
    assert all(secret not in str(value) for row in rows for value in row)
    assert rows[0][2] == hash_key(secret)


def test_cli_create_list_revoke(database_url, capsys):
    with connect(database_url).begin() as connection:
        connection.execute(api_keys.delete())
    assert keys.main(["--db", database_url, "create", "--name", "acme", "--rpm", "60"]) == 0
    created = capsys.readouterr().out.splitlines()
    key_id, secret = created[0].split()[2], created[1]
    assert keys.main(["--db", database_url, "list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed == [{**listed[0], "id": key_id, "name": "acme", "requests_per_minute": 60, "revoked_at": None}]
    assert secret not in json.dumps(listed)
    assert keys.main(["--db", database_url, "revoke", key_id]) == 0
    assert keys.main(["--db", database_url, "revoke", key_id]) == 1


def test_cli_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        keys.main(["--help"])
    text = capsys.readouterr().out
    assert "shown once" in text or "printed once" in text
    assert "create" in text and "revoke" in text and "QWEN3_SERVE_DB" in text


def test_database_url_resolution(monkeypatch):
    monkeypatch.delenv("QWEN3_SERVE_DB", raising=False)
    assert resolve_url(None).endswith("/var/qwen3-serve.db") and resolve_url(None).startswith("sqlite:////")
    assert resolve_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("QWEN3_SERVE_DB", "sqlite:////tmp/x.db")
    assert resolve_url("postgresql+psycopg://u@h/db") == "sqlite:////tmp/x.db"


def test_cli_finds_the_database_of_a_config(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QWEN3_SERVE_DB", raising=False)
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "local.yaml").read_text())
    config["applications"][0]["args"]["database_url"] = f"sqlite:///{tmp_path / 'from-config.db'}"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert keys.main(["--config", str(path), "create", "--name", "via-config"]) == 0
    assert (tmp_path / "from-config.db").exists()
    assert keys.main(["--config", str(path), "list", "--json"]) == 0
    assert '"name": "via-config"' in capsys.readouterr().out


@pytest.mark.parametrize("name, limits, field", [
    ("", {}, "name"), ("   ", {}, "name"), ("x" * 201, {}, "name"), ("a\x00b", {}, "name"),
    ("acme", {"requests_per_minute": 0}, "requests_per_minute"),
    ("acme", {"tokens_per_minute": -1}, "tokens_per_minute"),
    ("acme", {"tokens_per_minute": 2**31}, "tokens_per_minute"),
])
def test_a_key_needs_a_name_and_limits_of_at_least_one(store, name, limits, field):
    """A limit of 0 would read as "no limit" where limits are checked for truth: refused, not stored."""
    with pytest.raises(InvalidKeySettings) as refused:
        store.create(name, **limits)
    assert refused.value.field == field and isinstance(refused.value, ValueError)
    assert store.list() == []


def test_cli_refuses_a_zero_limit(database_url, capsys):
    assert keys.main(["--db", database_url, "create", "--name", "acme", "--rpm", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
