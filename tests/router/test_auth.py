import pytest

from services.runtime.auth import CLUSTER_TOKEN_ENV, DEV_CLUSTER_TOKEN, resolve_cluster_token, token_matches


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
