"""Drivers that measure runs_app's peers, each run by bench/run.py --peers in the peer's own
virtualenv (bench/.peers/<name>/, git-ignored). Not imported by the harness: each driver is a
standalone script; ``_common`` holds what they share (standard library and psycopg only)."""
