"""The example project's own tracked models: repositories and their owners, synced from a
GitHub-like source (``manage.py sync_repositories``).

Both are whole-table models (``sync_scope = None``): the source's ids are global (GitHub's
repository and account ids are unique across GitHub), so the whole table is one scope, the
key alone is unique, and a repository's foreign key points at one owner row whatever run or
scope wrote it. A scope field (``sync_scope = "scope"`` with a unique constraint on
``(scope, github_id)``) fits a source that is partitioned instead, e.g. one scope per
customer whose ids are only unique inside it.
"""

from __future__ import annotations

from django.db import models

from runs_app.tracking import TrackedModel


class OwnerKind(models.TextChoices):
    USER = "User", "user"
    ORGANIZATION = "Organization", "organization"


class Owner(TrackedModel):
    """An account owning repositories. The source's integer id is the primary key and the sync
    key, so a repository's ``owner`` is the source's own owner id."""

    id = models.BigIntegerField(primary_key=True)
    login = models.CharField(max_length=39)
    kind = models.CharField(max_length=12, choices=OwnerKind.choices)
    url = models.URLField()

    sync_key = ("id",)
    sync_name = "owners"

    class Meta:
        ordering = ["login"]

    def __str__(self) -> str:
        return self.login


class Repository(TrackedModel):
    """A repository, keyed by the source's integer id (``github_id``, unique): typed columns,
    a foreign key to its owner (``PROTECT``: an owner cannot go while it owns repositories, so
    the job cleans up repositories before owners)."""

    github_id = models.BigIntegerField(unique=True)
    owner = models.ForeignKey(Owner, on_delete=models.PROTECT, related_name="repositories")
    name = models.CharField(max_length=100)
    url = models.URLField()
    stars = models.PositiveIntegerField(default=0)
    archived = models.BooleanField(default=False)
    language = models.CharField(max_length=40, blank=True, default="")
    source_created_at = models.DateTimeField()

    sync_key = ("github_id",)
    sync_name = "repositories"

    class Meta:
        ordering = ["github_id"]
        verbose_name_plural = "repositories"

    def __str__(self) -> str:
        return self.name
