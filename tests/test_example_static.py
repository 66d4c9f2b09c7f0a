"""The example project's admin is styled as the README opens it: ``manage.py runserver`` under
the project's default ``DEBUG=False``, where Django serves no static file, so WhiteNoise (in the
example's middleware, through the staticfiles finders) must serve the admin's CSS."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from tests.relay_helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
ADMIN_CSS = "/static/admin/css/base.css"


def test_the_suite_runs_the_example_settings_without_debug() -> None:
    # The point of the other tests: under DEBUG the staticfiles app would serve the CSS itself.
    assert settings.DEBUG is False
    assert "whitenoise.middleware.WhiteNoiseMiddleware" in settings.MIDDLEWARE


@pytest.mark.django_db
def test_login_page_links_a_stylesheet_the_wsgi_stack_serves() -> None:
    client = Client()
    login = client.get("/admin/login/")
    assert login.status_code == 200
    assert ADMIN_CSS in login.content.decode()

    css = client.get(ADMIN_CSS)

    assert css.status_code == 200
    assert css["Content-Type"].startswith("text/css")
    assert b"--body-bg" in b"".join(css.streaming_content)  # the admin's stylesheet, not a 404 page


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def runserver(tmp_path: Path) -> Iterator[str]:
    """``manage.py runserver`` as the README runs it (example settings, DEBUG off), on a free
    port and a database of its own; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "DEBUG": "False",
    }
    env.pop("TEST_DATABASE_NAME", None)
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            assert server.poll() is None, f"runserver exited: {server.stderr.read()}"  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(answers, timeout=60, what="runserver to listen")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()


def test_runserver_serves_the_admin_css_with_debug_off(runserver: str) -> None:
    with urllib.request.urlopen(f"{runserver}/admin/login/", timeout=30) as login:
        page = login.read().decode()
    stylesheets = re.findall(r'href="(/static/[^"]+\.css)"', page)
    assert ADMIN_CSS in stylesheets

    for path in stylesheets:
        with urllib.request.urlopen(f"{runserver}{path}", timeout=30) as css:
            assert css.status == 200, path
            assert css.headers["Content-Type"].startswith("text/css"), path

    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{runserver}/static/admin/css/no-such-file.css", timeout=30)
    missing.value.close()
    assert missing.value.code == 404
