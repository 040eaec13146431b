"""Alembic environment. glmstack runs migrations itself (`glmstack.store.db.migrate`, on every start), passing
its connection in `config.attributes["connection"]`; the fallback below serves a developer running the
`alembic` command against $GLMSTACK_DATABASE_URL, e.g. to autogenerate the next revision."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from glmstack.store.tables import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from glmstack.settings import Settings
    from glmstack.store.db import Database

    url = Settings.from_env().database_url
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        database = Database(url)
        try:
            with database.write() as conn:
                _run(conn)
        finally:
            database.dispose()
