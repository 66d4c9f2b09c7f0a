"""The banner at the top of a run's page: what is wrong with the run and what to do about it.

One banner per problem, most urgent first: delivery blocked, run failed, cleanup refused. A
healthy run has none.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.utils.translation import gettext as _

from ..models import CleanupStatus, Run, RunEvent, RunModelState, RunStatus
from .display import refused_for_a_problem, related


@dataclass(frozen=True)
class Banner:
    """``title``: what is wrong; ``detail``: the error as the app recorded it (shown as
    written); ``advice``: what to do."""

    id: str
    title: str
    detail: str
    advice: str


def run_banners(run: Run) -> list[Banner]:
    """The banners of ``run`` (its state and outbox joined, as the run admin fetches it). At
    most two queries, only for a blocked or a failed run: the blocked event, the failure's
    reason."""
    banners: list[Banner] = []
    outbox = related(run, "outbox")
    state = related(run, "state")
    if outbox is not None and outbox.blocked_at is not None:
        head = RunEvent.objects.filter(run_id=run.pk, seq=outbox.next_seq).only("type").first()
        title = (
            _("Delivery is blocked at event seq %(seq)d (%(type)s).")
            % {"seq": outbox.next_seq, "type": head.type}
            if head is not None
            else _("Delivery is blocked at event seq %(seq)d, which is missing (a gap).")
            % {"seq": outbox.next_seq}
        )
        banners.append(
            Banner(
                id="runs-banner-blocked",
                title=title,
                detail=outbox.last_error,
                advice=_(
                    "Nothing after it is delivered. Fix the cause (the error above), then use "
                    "Retry delivery now; or use Skip blocked event to give it up: it is never "
                    "delivered, the skip is recorded as an outbox.skipped event and delivery "
                    "goes on with the next event."
                ),
            )
        )
    if state is not None and state.status == RunStatus.FAILED:
        failure = (
            RunEvent.objects.filter(run_id=run.pk, type="run.failed")
            .order_by("-seq")
            .values_list("payload", flat=True)
            .first()
        )
        reason = failure.get("reason", "") if isinstance(failure, dict) else ""
        banners.append(
            Banner(
                id="runs-banner-failed",
                title=_("This run failed (%(reason)s).") % {"reason": reason}
                if reason
                else _("This run failed."),
                detail=state.error,
                advice=_(
                    "A failed run stays failed and confirms nothing. Fix the cause, then start a "
                    "new run of the scope %(scope)s."
                )
                % {"scope": run.scope},
            )
        )
    if state is not None and refused_for_a_problem(state):
        withheld = RunModelState.objects.filter(
            run_id=run.pk, cleanup_status=CleanupStatus.REFUSED, withheld_count__isnull=False
        ).exists()
        advice = _("Nothing was deleted. The cleanup ledger below shows each model's outcome.")
        if withheld:
            advice += " " + _(
                "The plan is withheld: check it below, then use Approve withheld cleanup to "
                "remove at most the rows it shows."
            )
        banners.append(
            Banner(
                id="runs-banner-cleanup-refused",
                title=_("Cleanup refused (%(reason)s).") % {"reason": state.cleanup_reason},
                detail=state.cleanup_message,
                advice=advice,
            )
        )
    return banners
