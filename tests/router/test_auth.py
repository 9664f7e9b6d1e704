import pytest

from services.router.config import RouterConfig
from services.runtime.auth import (
    API_KEY_ENV, CLUSTER_TOKEN_ENV, DEV_CLUSTER_TOKEN, api_key_matches, resolve_api_keys, resolve_cluster_token,
    token_matches,
)


def test_resolution_order_and_loopback_only_default(monkeypatch):
    monkeypatch.delenv(CLUSTER_TOKEN_ENV, raising=False)
    assert resolve_cluster_token(None, "127.0.0.1") == DEV_CLUSTER_TOKEN
    with pytest.raises(ValueError, match="cluster token"):
        resolve_cluster_token(None, "0.0.0.0")
    monkeypatch.setenv(CLUSTER_TOKEN_ENV, "from-env")
    assert resolve_cluster_token(None, "0.0.0.0") == "from-env"
    assert resolve_cluster_token("flag", "0.0.0.0") == "flag"


def test_token_matches():
    assert token_matches("abc", "abc")
    assert not token_matches("abc", "abd")
    assert not token_matches("abc", None)


def test_api_keys_come_from_the_flags_else_the_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_keys(None) == ()
    monkeypatch.setenv(API_KEY_ENV, "sk-a, sk-b,")
    assert resolve_api_keys(None) == ("sk-a", "sk-b")
    assert resolve_api_keys(["sk-flag"]) == ("sk-flag",)
    for bad in ([""], [" sk-padded"], ["sk-a", "  "]):
        with pytest.raises(ValueError, match="API key must be non-empty"):
            resolve_api_keys(bad)
    with pytest.raises(ValueError, match="api_keys must be non-empty"):
        RouterConfig(cluster_token="t", api_keys=("",))


def test_api_key_matches_a_bearer_credential_only():
    keys = ("sk-a", "sk-b")
    assert api_key_matches(keys, "Bearer sk-b")
    assert api_key_matches(keys, "bearer sk-a")
    for header in (None, "", "sk-a", "Bearer", "Bearer ", "Bearer sk-c", "Basic sk-a", "Bearer sk-a2"):
        assert not api_key_matches(keys, header), header
