"""runs_app: run-based data management for Django.

Public API: :mod:`runs_app.services` (functions), :mod:`runs_app.models`,
:mod:`runs_app.exceptions`.
"""

# The package's one version: pyproject.toml reads it (setuptools dynamic version), and
# CHANGELOG.md has a section for it.
__version__ = "0.4.1"
