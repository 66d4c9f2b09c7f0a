"""Drop the event table's index on ``run_id`` alone (and PostgreSQL's varchar_pattern_ops copy):
the (run, seq) unique index leads with the run and serves every lookup by run, while each extra
index costs an entry per event written and per event the relay marks published.

Only the indexes go: Django's own ``AlterField`` would also drop and re-add the foreign key,
which re-checks every event row under a lock that blocks appends (seconds on a large outbox).
"""

import django.db.models.deletion
from django.db import migrations, models


def _run_indexes(schema_editor, model):
    """The indexes on ``run_id`` alone that are not a constraint (by introspection: their names
    come from the Django version that created them)."""
    return schema_editor._constraint_names(
        model, ["run_id"], index=True, unique=False, primary_key=False
    )


def drop_run_index(apps, schema_editor):
    model = apps.get_model("runs_app", "RunEvent")
    for name in _run_indexes(schema_editor, model):
        schema_editor.execute(schema_editor._delete_index_sql(model, name))


def create_run_index(apps, schema_editor):
    model = apps.get_model("runs_app", "RunEvent")
    if _run_indexes(schema_editor, model):
        return
    field = model._meta.get_field("run")
    schema_editor.execute(schema_editor._create_index_sql(model, fields=[field]))
    like = getattr(schema_editor, "_create_like_index_sql", None)  # PostgreSQL only
    if like is not None and (statement := like(model, field)) is not None:
        schema_editor.execute(statement)


class Migration(migrations.Migration):

    dependencies = [
        ("runs_app", "0005_source_state_and_trace_context"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="runevent",
                    name="run",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="events",
                        to="runs_app.run",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunPython(drop_run_index, create_run_index, elidable=False),
            ],
        ),
    ]
