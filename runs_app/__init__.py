"""runs_app: run-based data management for Django.

Public API: :mod:`runs_app.services` (functions), :mod:`runs_app.models`,
:mod:`runs_app.exceptions`.
"""
