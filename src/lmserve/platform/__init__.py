"""The platform around the engine: accounts and API keys (keys), rate limits (limits), the usage
ledger and balances (usage), prices (pricing), all in one database
(db: SQLAlchemy, SQLite by default, PostgreSQL by URL). `service.Platform` is what the server
calls; the CLI and the admin API call the same functions."""
