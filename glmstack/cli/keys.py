"""`glmstack keys ...` and `glmstack usage`: API keys and token usage from the command line.

    glmstack keys create [--name N] [--concurrency N]   prints the new key (shown only this once)
    glmstack keys list                                  every key, revoked ones included
    glmstack keys revoke ID
    glmstack usage [--key ID]                           requests and tokens per key and model

They act on the database in $GLMSTACK_DATABASE_URL (default: SQLite in $GLMSTACK_HOME), so they work while
a server is running on it. Imports stay inside run() so that `glmstack chat` does not load SQLAlchemy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glmstack.store import Store

COMMANDS = ("keys", "usage")
EXIT_FAILURE, EXIT_USAGE = 1, 2


def add_subcommands(subparsers: Any) -> None:
    """Adds `keys` and `usage` to the `glmstack` parser's subparsers."""
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it (it is shown only once)")
    create.add_argument("--name", default="", help="a label for the key, e.g. who or what uses it")
    create.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="most requests this key may run at once "
                             "(default: $GLMSTACK_MAX_CONCURRENCY_PER_KEY, else only the server's queue)")
    keys_sub.add_parser("list", help="list keys, revoked ones included")
    revoke = keys_sub.add_parser("revoke", help="revoke a key; requests using it are refused from now on")
    revoke.add_argument("id", help="the key's id (the part before the '.')")

    usage = subparsers.add_parser("usage", help="requests and tokens used per key and model")
    usage.add_argument("--key", default=None, metavar="ID", help="only this key's usage")


def run(args: argparse.Namespace) -> int:
    from glmstack.settings import Settings
    from glmstack.store import Store, StoreError

    try:
        settings = Settings.from_env()
        with Store(settings.database_url, home=settings.home) as store:
            if args.command == "usage":
                return _usage(store, args.key)
            return _keys(store, args)
    except (StoreError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"glmstack: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(exc, StoreError) else EXIT_USAGE


def _keys(store: Store, args: argparse.Namespace) -> int:
    if args.keys_command == "create":
        record, full_key = store.keys.create(args.name, concurrency_limit=args.concurrency)
        # The key alone on stdout, so `KEY=$(glmstack keys create)` works; the advice goes to stderr.
        print(full_key)
        print(f"created key {record.id}{f' ({record.name})' if record.name else ''}; "
              "store it now, it cannot be shown again", file=sys.stderr)
        return 0
    if args.keys_command == "revoke":
        if store.keys.revoke(args.id):
            print(f"revoked key {args.id}", file=sys.stderr)
            return 0
        print(f"glmstack: error: no active key with id {args.id!r}", file=sys.stderr)
        return EXIT_FAILURE
    records = store.keys.list()
    if not records:
        print("no keys yet; create one with `glmstack keys create`", file=sys.stderr)
        return 0
    print_table(
        ["ID", "NAME", "CREATED (UTC)", "STATUS", "CONCURRENCY"],
        [[r.id, r.name or "-", f"{r.created_at:%Y-%m-%d %H:%M}",
          "active" if r.revoked_at is None else f"revoked {r.revoked_at:%Y-%m-%d %H:%M}",
          "default" if r.concurrency_limit is None else str(r.concurrency_limit)] for r in records],
        numeric=set(),
    )
    return 0


def _usage(store: Store, key_id: str | None) -> int:
    rows = store.usage.report(key_id)
    if not rows:
        print("no usage recorded" + (f" for key {key_id}" if key_id else ""), file=sys.stderr)
        return 0
    print_table(
        ["KEY", "MODEL", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL TOKENS"],
        [[r.key_id or "(no key)", r.model, str(r.requests), str(r.prompt_tokens), str(r.completion_tokens),
          str(r.total_tokens)] for r in rows],
        numeric={2, 3, 4, 5},
    )
    return 0


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: set[int]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    for line in [headers, *rows]:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells).rstrip())
