"""The credential check on its own: raw keys and the platform's millisecond HS256 JWT, signed here exactly as
the official SDKs sign it (PyJWT, header {"alg","sign_type","typ"}, payload {"api_key","exp","timestamp"})."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from glmstack.api.auth import MAX_TOKEN_LIFETIME_MS, credential_from, is_loopback, verify_jwt
from glmstack.api.errors import PlatformError

KEY_ID, SECRET = "abcdefghijklmnop", "s3cret-s3cret-s3cret"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sdk_token(
    exp_offset_ms: int = 210_000, *, secret: str = SECRET, headers: dict | None = None, **payload: object
) -> str:
    """What zhipuai's generate_token produces."""
    now = now_ms()
    body = {"api_key": KEY_ID, "exp": now + exp_offset_ms, "timestamp": now, **payload}
    return jwt.encode(
        body,
        secret,
        algorithm="HS256",
        headers=headers if headers is not None else {"alg": "HS256", "sign_type": "SIGN"},
    )


def hand_token(header: dict, payload: dict, secret: str = SECRET) -> str:
    """A token built byte by byte, for headers PyJWT would refuse to produce."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def secrets_of(key_id: str) -> str | None:
    return SECRET if key_id == KEY_ID else None


def code_of(token: str) -> int:
    with pytest.raises(PlatformError) as caught:
        verify_jwt(token, secrets_of, now_ms())
    return caught.value.code


def test_sdk_token_verifies() -> None:
    token = sdk_token()
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "sign_type": "SIGN", "typ": "JWT"}  # PyJWT adds typ
    assert verify_jwt(token, secrets_of, now_ms()) == (KEY_ID, SECRET)


def test_expiry_is_in_milliseconds() -> None:
    assert code_of(sdk_token(-1000)) == 1003  # expired a second ago
    # A seconds-based exp is long past when read as milliseconds
    seconds_exp = hand_token(
        {"alg": "HS256", "sign_type": "SIGN"}, {"api_key": KEY_ID, "exp": int(time.time()) + 60}
    )
    assert code_of(seconds_exp) == 1003


def test_bad_signatures_and_unknown_keys() -> None:
    assert code_of(sdk_token(secret="not-the-secret")) == 1004
    assert (
        code_of(
            hand_token({"alg": "HS256", "sign_type": "SIGN"}, {"api_key": "nobody", "exp": now_ms() + 10_000})
        )
        == 1004
    )
    token = sdk_token()
    assert code_of(token[:-2] + ("AA" if not token.endswith("AA") else "BB")) == 1004


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none", "sign_type": "SIGN"},
        {"alg": "HS512", "sign_type": "SIGN"},
        {"alg": "HS256"},  # sign_type is part of the platform's header
        {"alg": "HS256", "sign_type": "SIGN", "typ": "JWE"},
        {"alg": "HS256", "sign_type": "SIGN", "crit": ["exp"]},
    ],
)
def test_other_headers_are_refused(header: dict) -> None:
    assert code_of(hand_token(header, {"api_key": KEY_ID, "exp": now_ms() + 10_000})) == 1002


def test_alg_none_without_signature_is_refused() -> None:
    token = hand_token({"alg": "none", "sign_type": "SIGN"}, {"api_key": KEY_ID, "exp": now_ms() + 10_000})
    assert code_of(token.rsplit(".", 1)[0] + ".") == 1002


@pytest.mark.parametrize(
    "payload",
    [
        {"api_key": KEY_ID},  # no exp
        {"api_key": KEY_ID, "exp": "soon"},
        {"api_key": KEY_ID, "exp": True},
        {"exp": 10**13},  # no api_key
    ],
)
def test_payload_must_name_key_and_expiry(payload: dict) -> None:
    assert code_of(hand_token({"alg": "HS256", "sign_type": "SIGN"}, payload)) == 1002


def test_lifetime_is_bounded() -> None:
    assert code_of(sdk_token(MAX_TOKEN_LIFETIME_MS + 60_000)) == 1002
    assert verify_jwt(sdk_token(MAX_TOKEN_LIFETIME_MS - 60_000), secrets_of, now_ms())[0] == KEY_ID


@pytest.mark.parametrize("garbage", ["a.b.c", "!!!.???.***", "e30.e30.e30", "W10.W10.AA"])
def test_garbage_is_malformed(garbage: str) -> None:
    assert code_of(garbage) == 1002


def test_bearer_prefix_is_optional() -> None:
    assert credential_from("Bearer id.secret") == "id.secret"
    assert credential_from("bearer   id.secret") == "id.secret"
    assert credential_from("id.secret") == "id.secret"
    for missing in (None, "", "   "):
        with pytest.raises(PlatformError) as caught:
            credential_from(missing)
        assert caught.value.code == 1001
    with pytest.raises(PlatformError) as caught:
        credential_from("Bearer id.secret extra")
    assert caught.value.code == 1002


def test_loopback_is_decided_from_the_bind_address() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com", ""]))
