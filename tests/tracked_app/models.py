"""Tracked models as projects write them: typed keys (UUID, integers, several fields), a scope
field or the whole table as one scope, foreign keys, fields the source does not own."""

from __future__ import annotations

import uuid

from django.db import models

from runs_app.models import SoftDeleteTrackedModel, TrackedModel


class Site(TrackedModel):
    """A whole-table model whose key is its primary key, given by the source."""

    id = models.BigIntegerField(primary_key=True)
    name = models.CharField(max_length=100)

    sync_key = ("id",)
    sync_name = "sites"


class Device(TrackedModel):
    """Scoped by tenant, keyed by a UUID, with typed columns and a foreign key."""

    tenant = models.CharField(max_length=200)
    uid = models.UUIDField()
    name = models.CharField(max_length=50)
    site = models.ForeignKey(Site, on_delete=models.PROTECT, null=True, blank=True)
    port = models.PositiveIntegerField(default=0)
    online = models.BooleanField(default=False)
    price = models.DecimalField(max_digits=8, decimal_places=2, null=True, blank=True)
    seen_on = models.DateTimeField(null=True, blank=True)
    attrs = models.JSONField(default=dict, blank=True)
    kind = models.CharField(
        max_length=10, choices=[("phone", "phone"), ("laptop", "laptop")], default="phone"
    )
    # The project's own: never written by a flush.
    note = models.TextField(blank=True, default="")
    token = models.UUIDField(default=uuid.uuid4)

    sync_key = ("uid",)
    sync_scope = "tenant"
    sync_fields = ("name", "site", "port", "online", "price", "seen_on", "attrs", "kind")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "uid"], name="tracked_app_device_key"),
        ]


class Membership(TrackedModel):
    """A whole-table model keyed by two fields (an integer and a string)."""

    repo_id = models.IntegerField()
    login = models.CharField(max_length=40)
    role = models.CharField(max_length=20)

    sync_key = ("repo_id", "login")

    class Meta:
        unique_together = [("repo_id", "login")]


class Asset(SoftDeleteTrackedModel):
    """A soft-deleting model: cleanup tombstones its rows; typed columns, bytes, a foreign key."""

    tenant = models.CharField(max_length=200)
    code = models.CharField(max_length=40)
    name = models.CharField(max_length=100)
    size = models.IntegerField(default=0)
    attrs = models.JSONField(default=dict, blank=True)
    seen_on = models.DateTimeField(null=True, blank=True)
    active = models.BooleanField(default=True)
    blob = models.BinaryField(null=True, blank=True)
    site = models.ForeignKey(Site, on_delete=models.PROTECT, null=True, blank=True)

    sync_key = ("code",)
    sync_scope = "tenant"
    sync_name = "assets"

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "code"], name="tracked_app_asset_key"),
        ]
