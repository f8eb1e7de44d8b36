"""Per-recipient outcomes of one message, and the message-level disposition they add up to.

Filters never talk to Postfix: they set each recipient's :class:`RecipientOutcome`
(deliver / reject / discard / quarantine / tempfail, plus content edits and
notices).  :meth:`Verdict.disposition` merges them:

* any tempfail -> the whole message is refused with 4xx (a recipient cannot be
  deferred alone at end-of-data);
* nobody left to deliver to -> 5xx if any recipient rejects it, else a silent
  discard (quarantine and discard are silent);
* otherwise accept, removing the blocked recipients and giving each group of
  recipients with the same edits its own copy (see :mod:`milters.variants`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from mailwarden.notify import Notice
from mailwarden.policy import EffectivePolicy


class Action(StrEnum):
    """What happens to the message for one recipient."""

    DELIVER = "deliver"
    REJECT = "reject"
    DISCARD = "discard"
    QUARANTINE = "quarantine"
    TEMPFAIL = "tempfail"


# When several filters block one recipient the strongest wins.
_STRENGTH = {Action.DELIVER: 0, Action.DISCARD: 1, Action.QUARANTINE: 2, Action.REJECT: 3, Action.TEMPFAIL: 4}


@dataclass(frozen=True)
class Recipient:
    """An envelope recipient with its ESMTP parameters and effective policy."""

    address: str
    """The address without angle brackets."""
    params: tuple[str, ...]
    policy: EffectivePolicy
    raw: str = ""
    """As the MTA passed it (what delrcpt must be given back)."""


@dataclass(frozen=True)
class AddHeader:
    """Add a header field at the end of the header section."""

    name: str
    value: str


@dataclass(frozen=True)
class RemoveHeader:
    """Remove every field called ``name`` (a forged copy of one we set), or only the
    ``indexes``-th ones (1-based among the fields of that name, as received)."""

    name: str
    indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class TagSubject:
    """Put ``tag`` before the Subject."""

    tag: str


@dataclass(frozen=True)
class StripParts:
    """Replace leaf parts by a short text saying what was removed and why."""

    parts: tuple[int, ...]
    names: tuple[str, ...]
    language: str
    template: str
    domain: str = ""


Edit = AddHeader | RemoveHeader | TagSubject | StripParts


@dataclass
class RecipientOutcome:
    """What the filters decided for one recipient."""

    recipient: Recipient
    action: Action = Action.DELIVER
    reasons: list[str] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things worth logging that did not change the outcome (a check accepted on failure)."""
    blocked_by: str = ""
    """The filter (or step) that first took the recipient out of delivery (for metrics)."""

    @property
    def address(self) -> str:
        """The recipient address."""
        return self.recipient.address

    @property
    def policy(self) -> EffectivePolicy:
        """The recipient's effective policy."""
        return self.recipient.policy

    @property
    def in_play(self) -> bool:
        """Still to be delivered (later filters still look at it)."""
        return self.action is Action.DELIVER

    def block(self, action: Action, reason: str) -> None:
        """Block for this recipient; the strongest action of several wins."""
        if _STRENGTH[action] > _STRENGTH[self.action]:
            self.action = action
        self.reasons.append(reason)

    def edit(self, edit: Edit) -> None:
        """Add a content edit once."""
        if edit not in self.edits:
            self.edits.append(edit)

    @property
    def variant(self) -> tuple[Edit, ...]:
        """The content this recipient gets: recipients with equal variants share one copy."""
        return tuple(self.edits)

    def summary(self) -> str:
        """``address=action[reasons]`` for the log line."""
        details = "; ".join(self.reasons + self.notes)
        if self.action is Action.DELIVER and self.edits:
            details = "; ".join(filter(None, [details, _edits_text(self.edits)]))
        return f"{self.address}={self.action.value}" + (f"[{details}]" if details else "")


def _edits_text(edits: list[Edit]) -> str:
    words = []
    for e in edits:
        if isinstance(e, StripParts):
            words.append("stripped " + ",".join(e.names))
        elif isinstance(e, TagSubject):
            words.append("subject tagged")
    return "; ".join(words)


class Disposition(StrEnum):
    """What the milter answers at end of message."""

    ACCEPT = "accept"
    REJECT = "reject"
    DISCARD = "discard"
    TEMPFAIL = "tempfail"


@dataclass
class Verdict:
    """All recipients' outcomes plus what was found about the message as a whole."""

    outcomes: list[RecipientOutcome]
    findings: dict[str, str] = field(default_factory=dict)
    """Scanner results and timings for the log line (``virus=clean``, ``spam=3.1``)."""

    @property
    def disposition(self) -> Disposition:
        """The message-level answer the outcomes add up to."""
        actions = {o.action for o in self.outcomes}
        if Action.TEMPFAIL in actions:
            return Disposition.TEMPFAIL
        if Action.DELIVER in actions or not self.outcomes:
            return Disposition.ACCEPT
        if Action.REJECT in actions:
            return Disposition.REJECT
        return Disposition.DISCARD

    def first_reason(self, action: Action) -> str:
        """The first reason given for ``action`` (for the SMTP reply text)."""
        for o in self.outcomes:
            if o.action is action and o.reasons:
                return o.reasons[-1] if action is Action.TEMPFAIL else o.reasons[0]
        return action.value

    def delivered(self) -> list[RecipientOutcome]:
        """Recipients that get the message."""
        return [o for o in self.outcomes if o.action is Action.DELIVER]

    def groups(self) -> list[tuple[tuple[Edit, ...], list[RecipientOutcome]]]:
        """Delivered recipients grouped by identical content, largest group first.

        The first group's copy is the one the milter edits in place; each other group
        gets its own copy re-injected.  Ties go to the unedited group, then to the
        first recipient's order.
        """
        groups: dict[tuple[Edit, ...], list[RecipientOutcome]] = {}
        for o in self.delivered():
            groups.setdefault(o.variant, []).append(o)
        return sorted(groups.items(), key=lambda kv: (-len(kv[1]), len(kv[0]) > 0))
