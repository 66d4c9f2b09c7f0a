"""The operator's view: a read-only admin of runs, their states, events, outboxes and projects.

Nothing here writes a row itself. Every page is read-only (no add, change or delete, every field
read-only); the actions ("retry delivery now", "skip blocked event", "mark failed") call the
functional API in :mod:`runs_app.services`, which owns the transactions, report through the
messages framework and are written to the admin log (:mod:`.actions`).

Who may do what: staff with a model's *view* permission see its pages; the actions also need the
model's *change* permission (``runs_app.change_run`` / ``runs_app.change_runoutbox``), which here
means "may operate runs", since the admin never edits a row. Staff without any runs_app
permission see nothing of the app.

The facts the pages show (delivered up to, pending events, lag) come from
:mod:`runs_app.inspection`, shared with the ``runs_status`` command.

The package: one module per admin (:mod:`.run`, :mod:`.run_state`, :mod:`.outbox`,
:mod:`.event`, :mod:`.project`), the pieces they share (:mod:`.base` read-only base,
:mod:`.display` how values look, :mod:`.delivery` the delivery columns, :mod:`.filters`,
:mod:`.actions`, :mod:`.buttons` a page's buttons, :mod:`.confirmation` the confirmation
pages, :mod:`.banner` the run page's banner); the styles are ``static/runs_app/admin.css``.
Importing this package registers the admins (Django's admin autodiscovery does it).
"""

from . import event, outbox, project, run, run_state

__all__ = ["event", "outbox", "project", "run", "run_state"]
