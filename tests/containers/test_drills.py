"""Kill drills on the cluster: nothing lost, nothing duplicated, no virus delivered.

Every drill is a test (marker ``drills``).  The default run has the cheap subset
(:data:`DEFAULT`, about a minute); ``MAILWARDEN_DRILLS=all`` runs every one, as
``python -m harness.drills`` does, which also prints the table (docs/containers.md).
"""

from __future__ import annotations

import os

import pytest

from harness.containers import MailStack
from harness.drills import BY_NAME, SHORT_NAMES, run_drill, table

DEFAULT = ("milter", "redis")


@pytest.mark.drills
@pytest.mark.parametrize("name", SHORT_NAMES)
def test_mail_sent_during_the_drill_arrives_once_and_no_virus_does(stack: MailStack, name: str) -> None:
    if name not in DEFAULT and os.environ.get("MAILWARDEN_DRILLS") != "all":
        pytest.skip("not in the default subset: MAILWARDEN_DRILLS=all, or python -m harness.drills")
    result = run_drill(stack, BY_NAME[name], count=30)
    print(table([result]))
    assert result.sent == 30 and result.viruses_sent == 3
    assert result.lost == 0, result.missing
    assert result.duplicated == 0
    assert result.viruses_delivered == 0
    assert result.delivered == 27
