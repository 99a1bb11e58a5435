"""Settings and the bind-address rule (no keys: loopback only, and the server says so)."""

from __future__ import annotations

import pytest

from service.api.server import choose_host
from service.settings import SettingsError, load_settings, parse_api_keys


def test_api_keys_name_tenants_or_derive_them():
    keys = parse_api_keys("alice:k1, bob:k2,k3")
    assert keys["k1"] == "alice" and keys["k2"] == "bob"
    assert keys["k3"].startswith("key-") and "k3" not in keys["k3"]
    assert parse_api_keys("") == {} and parse_api_keys(None) == {}
    with pytest.raises(SettingsError):
        parse_api_keys("alice:")
    with pytest.raises(SettingsError):
        parse_api_keys("a:same,b:same")


def test_without_keys_the_server_binds_loopback_only():
    host, note = choose_host("0.0.0.0", auth_enabled=False)
    assert host == "127.0.0.1" and "127.0.0.1 only" in note
    assert choose_host(None, auth_enabled=False)[0] == "127.0.0.1"
    assert choose_host("0.0.0.0", auth_enabled=True) == ("0.0.0.0", None)


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFICULTY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DIFFICULTY_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.delenv("DIFFICULTY_DATABASE_URL", raising=False)
    settings = load_settings()
    assert settings.data_dir == tmp_path.resolve() and settings.max_upload_bytes == 1234
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'difficulty.db'}"
    assert load_settings(tmp_path / "other").data_dir == (tmp_path / "other").resolve()
    monkeypatch.setenv("DIFFICULTY_LEASE_SECONDS", "soon")
    with pytest.raises(SettingsError):
        load_settings()
