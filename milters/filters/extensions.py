"""Attachment-extension filter: the cheap one, run before the virus scanner.

Each recipient's banned list is the merged built-in + domain + user list from
the effective policy.  A name is checked where it is found: the MIME filename
(RFC 2231 and encoded-word forms decoded), the extension implied by the declared
content type, the real content (a PE executable is an ``.exe``), and every member
of zip/tar/gzip archives, nested.  The domain's ``extension_action`` either
rejects the message for that recipient or strips the offending parts.
"""

from __future__ import annotations

from typing import ClassVar

from mailwarden.catalogue import Service
from milters.filters import Backends, Context, plan_notices, unscannable
from milters.message import Attachment, Part
from milters.verdict import Action, RecipientOutcome, StripParts


def describe(hit: Attachment, banned: set[str]) -> str:
    """``invoice.pdf.exe (.exe)`` or ``run.scr (.scr in docs.zip > inner.zip)``."""
    ext = ",".join(sorted("." + e for e in hit.extensions & banned))
    where = "" if hit.where == "attachment" else f" {hit.where}"
    return f"{hit.name} ({ext}{where})"


def part_label(part: Part) -> str:
    """The name a reader knows a part by."""
    return part.filenames[0] if part.filenames else f"part {part.path} ({part.content_type})"


class ExtensionFilter:
    """Refuses or strips attachments with banned extensions, per recipient."""

    name: ClassVar[str] = "extensions"
    service: ClassVar[Service | None] = Service.EXTENSION_FILTER
    skipped_for_allowed_senders: ClassVar[bool] = False

    @classmethod
    def build(cls, backends: Backends) -> ExtensionFilter:
        """Nothing from outside: names and archive listings of the parsed message."""
        return cls()

    async def apply(self, ctx: Context, outcomes: list[RecipientOutcome]) -> None:
        """Check every recipient's banned list against the message's file inventory."""
        inventory = ctx.message.inventory
        incomplete = [u.reason for u in ctx.message.unscannable if u.listing]
        ctx.find("files", f"{len(inventory.attachments)}")
        for outcome in outcomes:
            banned = {str(e) for e in outcome.policy.get("banned_extensions")}
            hits = [a for a in inventory.attachments if a.extensions & banned]
            if not hits:
                if incomplete:
                    unscannable(outcome, incomplete[0], lasting=True)
                continue
            names = tuple(dict.fromkeys(describe(h, banned) for h in hits))
            reason = "banned attachment " + ", ".join(names)
            if outcome.policy.get("extension_action") == "strip":
                parts = tuple(sorted({h.part for h in hits}))
                outcome.edit(StripParts(
                    parts=parts,
                    names=tuple(part_label(ctx.message.parts[p]) for p in parts),
                    language=outcome.policy.get("notice_language"),
                    template=outcome.policy.get("notice_template"),
                    domain=outcome.policy.domain or "",
                ))
                outcome.notes.append(reason + " stripped")
                # The recipient reads the note in place of the part; others get a notice.
                plan_notices(ctx, outcome, "banned", reason, names, tell_recipient=False)
            else:
                outcome.block(Action.REJECT, reason)
                plan_notices(ctx, outcome, "banned", reason, names)
