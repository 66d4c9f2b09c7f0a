"""Django set-up shared by the Django peers' drivers: minimal settings on the driver's database,
migrated, DEBUG off (DEBUG keeps every query in memory). Runs in the peer's virtualenv."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


def setup(database_url: str, apps: list[str], **extra: Any) -> None:
    import django
    from django.conf import settings
    from django.core.management import call_command

    url = urlsplit(database_url)
    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        SECRET_KEY="bench",
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", *apps],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": url.path.lstrip("/"),
                "USER": url.username or "",
                "PASSWORD": url.password or "",
                "HOST": url.hostname or "",
                "PORT": str(url.port or ""),
            }
        },
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        LOGGING_CONFIG=None,
        **extra,
    )
    django.setup()
    call_command("migrate", verbosity=0)


def settle(*tables: str) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {', '.join(tables)}")
        cursor.execute("CHECKPOINT")


def scalar(statement: str, params: tuple[Any, ...] = ()) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        row = cursor.fetchone()
    return int(row[0]) if row else 0
