"""A user model of eight typed columns synced by runs: what the ``flush_model_*`` benchmarks
flush through ``services.flush(run, BenchRepo)`` and raw psycopg upserts (bench/raw.py) into the
same table, with the same indexes; ``restore`` puts its rows back after a cleanup.
``BenchSoftRepo``, the same columns on a soft-deleting model, is what ``cleanup_soft``
tombstones."""

from __future__ import annotations

from django.db import connection, models

from runs_app.tracking import SoftDeleteTrackedModel, TrackedModel


class BenchOwner(models.Model):
    """What ``BenchRepo.owner`` points to (rows seeded by the benchmark, untimed)."""

    id = models.BigIntegerField(primary_key=True)
    login = models.CharField(max_length=100)

    class Meta:
        db_table = "bench_owner"

    def __str__(self) -> str:
        return self.login


class BenchRepo(TrackedModel):
    """A repository as a GitHub sync would keep it: a bigint key from the source (unique), text,
    numbers, a flag, a foreign key by id, a timestamp and a UUID. The whole table is one scope."""

    id = models.BigAutoField(primary_key=True)
    github_id = models.BigIntegerField(unique=True)
    name = models.CharField(max_length=200)
    url = models.CharField(max_length=300)
    stars = models.IntegerField()
    archived = models.BooleanField(default=False)
    owner = models.ForeignKey(BenchOwner, on_delete=models.PROTECT, related_name="+")
    pushed_at = models.DateTimeField(null=True)
    node_id = models.UUIDField()

    sync_key = ("github_id",)
    sync_name = "repos"

    class Meta:
        db_table = "bench_repo"

    def __str__(self) -> str:
        return self.name


class BenchSoftRepo(SoftDeleteTrackedModel):
    """``BenchRepo``'s eight typed columns on a soft-deleting model: its cleanup sets the
    tombstone (``deleted_at``, ``deleted_by_run``, ``deleted_reason``) instead of deleting."""

    id = models.BigAutoField(primary_key=True)
    github_id = models.BigIntegerField(unique=True)
    name = models.CharField(max_length=200)
    url = models.CharField(max_length=300)
    stars = models.IntegerField()
    archived = models.BooleanField(default=False)
    owner = models.ForeignKey(BenchOwner, on_delete=models.PROTECT, related_name="+")
    pushed_at = models.DateTimeField(null=True)
    node_id = models.UUIDField()

    sync_key = ("github_id",)
    sync_name = "soft_repos"

    class Meta:
        db_table = "bench_soft_repo"

    def __str__(self) -> str:
        return self.name


MODELS: tuple[type[models.Model], ...] = (BenchOwner, BenchRepo, BenchSoftRepo)


def create_tables() -> None:
    """(Re)create the tables of ``MODELS``, with their indexes and constraints, as a migration
    would (schema_editor). Call with no transaction open."""
    existing = set(connection.introspection.table_names())
    with connection.schema_editor() as editor:
        for model in reversed(MODELS):
            if model._meta.db_table in existing:
                editor.delete_model(model)
        for model in MODELS:
            editor.create_model(model)
