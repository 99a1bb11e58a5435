"""Settings and the bind-address rule (no keys: loopback only, and the server says so)."""

from __future__ import annotations

import pytest

from service.api.server import choose_host
from service.settings import MIN_API_KEY_LENGTH, SettingsError, load_settings, parse_api_keys

K1, K2, K3 = "alice-key-0123456789", "bob-key-0123456789ab", "bare-key-0123456789abc"


def test_api_keys_name_tenants_or_derive_them():
    keys = parse_api_keys(f"alice:{K1}, bob:{K2},{K3}")
    assert keys[K1] == "alice" and keys[K2] == "bob"
    assert keys[K3].startswith("key-") and K3 not in keys[K3]
    assert parse_api_keys("") == {} and parse_api_keys(None) == {}
    with pytest.raises(SettingsError):
        parse_api_keys("alice:")
    with pytest.raises(SettingsError):
        parse_api_keys(f"a:{K1},b:{K1}")


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        # Before: accepted (a 2-character key for alice, a 3-character bare key).
        ("alice:k1", f"at least {MIN_API_KEY_LENGTH}"),
        ("k3y", f"at least {MIN_API_KEY_LENGTH}"),
        (f"alice:{K1}, bob:short", "entry 2 (tenant 'bob')"),
        # A bare key with ':' was split into a tenant and a shorter key; refused instead.
        ("correct:horse:battery-staple-0123", "more than one ':'"),
        ("s3cr3t/pass+word==:horse-battery-staple", "not a tenant name"),
        (":horse-battery-staple-0123", "not a tenant name"),
    ],
)
def test_short_or_ambiguous_api_keys_are_start_up_errors(raw, says, monkeypatch, tmp_path):
    with pytest.raises(SettingsError) as error:
        parse_api_keys(raw)
    assert says in str(error.value) and "DIFFICULTY_API_KEYS" in str(error.value)
    # No part of a key is echoed into the operator's logs.
    for part in raw.replace(":", ",").split(","):
        if len(part.strip()) > 6 and part.strip() not in ("alice", "bob"):
            assert part.strip() not in str(error.value)
    # The server and the workers refuse to start with it.
    monkeypatch.setenv("DIFFICULTY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DIFFICULTY_API_KEYS", raw)
    with pytest.raises(SettingsError):
        load_settings()


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


def test_http_server_limits_come_from_settings(monkeypatch, tmp_path):
    from service.api.server import uvicorn_limits

    monkeypatch.setenv("DIFFICULTY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DIFFICULTY_HTTP_MAX_CONNECTIONS", "50")
    monkeypatch.setenv("DIFFICULTY_HTTP_KEEP_ALIVE_SECONDS", "2")
    monkeypatch.setenv("DIFFICULTY_HTTP_MAX_HEADER_BYTES", "32768")
    limits = uvicorn_limits(load_settings())
    # h11: the parser whose header limit holds (tests/test_hostile_requests.py attacks it).
    assert limits == {"http": "h11", "h11_max_incomplete_event_size": 32768, "limit_concurrency": 50,
                      "timeout_keep_alive": 2}
