"""The metadata store: engine and managed sessions, ORM tables, pagination, migrations.

engine.py      make_engine(url), Database.session(), map_db_errors()
columns.py     column types (UtcDateTime, JSONType) and the etag mixin
models.py      every table of the metadata, in one SQLAlchemy metadata
pagination.py  paginate(): opaque keyset page tokens
migrate.py     upgrade / downgrade / check_at_head, driven by alembic
"""
