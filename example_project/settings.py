"""Settings of the example project (and of the test suite), read from the environment.

DATABASE_URL  default: a SQLite file next to this project (WAL, IMMEDIATE transactions)
              PostgreSQL: postgres://USER@HOST:5432/NAME (psycopg 3)
RUNS_APP_DATABASE_URL  optional: runs_app and the tracked models on this second database
              (alias "runs", routed by example_project.routers.RunsAppRouter)
SECRET_KEY    default: an insecure development key
DEBUG         default: False
STATIC_ROOT   default: unset (WhiteNoise serves the apps' static files where they are installed);
              set it to a directory to run collectstatic
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env(DEBUG=(bool, False))

SECRET_KEY = env("SECRET_KEY", default="django-insecure-runs-app-example-only")
DEBUG = env("DEBUG")
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "runs_app",
    "example_project",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's CSS and JS under DEBUG=False too (runserver serves none then), from the
    # one process the example runs in: no web server, no collectstatic step.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "example_project.wsgi.application"

DATABASES = {
    "default": env.db(
        "DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'example_project' / 'db.sqlite3'}"
    )
}
if env("RUNS_APP_DATABASE_URL", default=""):
    # runs_app (and the tracked models) on a database of their own: see routers.py and
    # docs/databases.md. Migrate it with `manage.py migrate --database=runs`.
    DATABASES["runs"] = env.db("RUNS_APP_DATABASE_URL")
    DATABASE_ROUTERS = ["example_project.routers.RunsAppRouter"]
    if DATABASES["runs"]["ENGINE"] == "django.db.backends.sqlite3":
        DATABASES["runs"]["OPTIONS"] = {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE: a transaction takes the write lock when it begins, so concurrent writers queue
    # (busy timeout) instead of failing half-way; WAL lets readers run beside the writer.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Tests with threads or processes need a file database, not the shared in-memory one.
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "example_project" / "test_db.sqlite3")}
if env("TEST_DATABASE_NAME", default=""):
    # Lets two test runs share one server (e.g. two checkouts) without clobbering each other.
    DATABASES["default"]["TEST"] = {"NAME": env("TEST_DATABASE_NAME")}

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# WhiteNoise finds the files through the staticfiles finders (in the installed apps), so the
# example needs no collectstatic; a missing STATIC_ROOT directory would only make it warn.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT = env("STATIC_ROOT", default=None)

DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

RUNS_APP: dict[str, object] = {}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "runs_app": {"handlers": ["console"], "level": env("RUNS_APP_LOG_LEVEL", default="WARNING")}
    },
}
