"""bench_milter's --variants: the keys name variants, unknown keys and a paced variant
without the one that sets its pace are refused."""

from __future__ import annotations

import pytest

from bench.bench_milter import ARCHIVED, PACED_WARDEN, VARIANT_KEYS, chosen_variants


def test_keys_name_variants() -> None:
    assert chosen_variants("virus-only, archived") == {"mailwarden, virus only", ARCHIVED}
    assert chosen_variants("all,paced-warden") == {VARIANT_KEYS["all"], PACED_WARDEN}


@pytest.mark.parametrize("spec", ["", "virus-only,nonsense", "paced-warden"])
def test_refused(spec: str) -> None:
    with pytest.raises(SystemExit):
        chosen_variants(spec)
