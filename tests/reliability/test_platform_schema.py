"""Generated requests against the real server's own /openapi.json, on SQLite and PostgreSQL (issue 7, test 5):
schemathesis draws valid and invalid requests for every operation; none may get a 5xx, every 4xx must be the
documented envelope, and no response may carry a traceback, a path of the server's or a secret."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from platform_server import Server, profile, record

import glmstack

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

PROFILE = profile()
# Shares of the case budget; the operations without parameters (health, metrics, the model list) have
# nothing to vary and get a handful each.
SHARES = {
    "POST /api/paas/v4/chat/completions": 0.55,
    "POST /": 0.3,
    "GET /api/paas/v4/models/{model_id}": 0.15,
}
FIXED_CASES = 5
# The chat endpoint makes up what the other operations fell short by, in at most this many rounds; each must
# get answers, or the server is not serving any more and more rounds would only spin.
MAKE_UP_ROUNDS = 20
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")


def forbidden_strings(server: Server) -> dict[str, str]:
    """What must never appear in a response: the server's secrets and the places it runs from."""
    strings = {
        server.key.split(".")[1]: "an API key's secret",
        (server.home / "secret.key").read_text().strip(): "the master key",
        str(server.home): "the server's home directory",
        str(Path(glmstack.__file__).parent): "the package directory",
        sys.prefix: "the Python environment",
        "site-packages": "a package path",
        server.database_url: "the database URL",
        "postgresql+psycopg://": "a database URL",
        "sqlite:///": "a database URL",
    }
    return {text: what for text, what in strings.items() if text}


def server_gone(server: Server) -> str | None:
    """Why the server can answer no more (it exited), with the end of its log; None while it runs."""
    status = server.proc.poll()
    if status is None:
        return None
    log = server.home / "server.log"
    tail = (log.read_text(errors="replace")[-3000:] if log.exists() else "") or "(nothing)"
    return f"the server exited with status {status}; its log ends:\n{tail}"


def problems_with(response: Any, forbidden: dict[str, str]) -> list[str]:
    found = []
    if response.status_code >= 500:
        found.append(f"HTTP {response.status_code}")
    if 400 <= response.status_code < 500:
        try:
            body = response.json()
            error = body["error"]
            ok = set(body) <= {"error", "contentFilter"} and set(error) == {"code", "message"}
            ok = ok and isinstance(error["code"], str) and isinstance(error["message"], str)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            found.append(f"HTTP {response.status_code} outside the envelope: {response.text[:200]!r}")
    text = response.text
    if TRACEBACK.search(text):
        found.append("a traceback")
    found += [what for needle, what in forbidden.items() if needle in text]
    return found


def test_generated_requests(api_server: Server) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(api_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= set(SHARES), [op.label for op in operations]
    forbidden = forbidden_strings(api_server)
    calls: dict[str, int] = {}
    failures: list[tuple[str, str, list[str]]] = []
    skipped: list[str] = []

    def run(operation: Any, mode: GenerationMode, examples: int) -> None:
        @settings(
            max_examples=examples,
            phases=[Phase.generate],
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode), served_model=st.booleans())
        def one(case: Any, served_model: bool) -> None:
            # Half the valid chat requests name a served model, so they run the model rather than stop at 1211
            if mode is GenerationMode.POSITIVE and served_model and isinstance(case.body, dict):
                if "model" in case.body:
                    case.body["model"] = "glm-4"
            try:
                response = case.call(base_url=api_server.url, headers=api_server.auth, timeout=60)
            except Exception as e:  # the server hung up or never answered
                failures.append((operation.label, repr(case.body)[:300], [f"{type(e).__name__}: {e}"]))
                response = None
            if response is None:
                if gone := server_gone(api_server):
                    pytest.fail(gone, pytrace=False)  # every case from here on would fail the same way
                return
            calls[operation.label] = calls.get(operation.label, 0) + 1
            if found := problems_with(response, forbidden):
                failures.append((operation.label, repr(case.body)[:300], found))

        one()

    for operation in operations:
        share = SHARES.get(operation.label)
        examples = round(PROFILE.schema_cases * share / 2) if share else FIXED_CASES
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                run(operation, mode, examples)
            except Exception as e:  # nothing negative to say about an operation without parameters
                if share and mode is GenerationMode.POSITIVE:
                    raise
                skipped.append(f"{operation.label} {mode.value}: {type(e).__name__}")
    # Hypothesis stops early where a space is small (the model ids): the chat endpoint makes up the rest
    chat = next(op for op in operations if op.label == next(iter(SHARES)))
    for _ in range(MAKE_UP_ROUNDS):
        if (total := sum(calls.values())) >= PROFILE.schema_cases:
            break
        if gone := server_gone(api_server):
            pytest.fail(gone)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run(chat, mode, max(1, (PROFILE.schema_cases - total + 1) // 2))
        if sum(calls.values()) == total:
            pytest.fail(
                f"a round of {chat.label} cases got no answer at all; the last failures: {failures[-5:]}"
            )
    total = sum(calls.values())
    database = "postgresql" if api_server.database_url.startswith("postgresql") else "sqlite"
    record(f"schemathesis_{database}", cases=total, failures=len(failures), per_operation=calls)
    assert failures == [], "\n".join(map(str, failures[:20]))
    assert total >= PROFILE.schema_cases, (
        f"{total} of {PROFILE.schema_cases} cases answered after {MAKE_UP_ROUNDS} make-up rounds: {calls}; "
        f"skipped: {skipped}"
    )


def test_server_log_is_clean(api_server: Server) -> None:
    """After all the bad input above (and in test_platform_api.py): nothing the server logged was a crash."""
    log = (api_server.home / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
