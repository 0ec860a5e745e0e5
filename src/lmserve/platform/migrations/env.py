"""Alembic environment for the platform schema. The server and the CLI run migrations through
`Database.migrate()`, which hands its connection in; `alembic -x url=...` works for authors."""

from alembic import context

from lmserve.platform.db import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # run from the alembic command line
    from sqlalchemy import create_engine

    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).begin() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
