"""One tiny base per family per session (built on first use)."""

from __future__ import annotations

import families as F
import pytest


@pytest.fixture(scope="session")
def family_base(tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = F.make_family_base(name, tmp_path_factory.mktemp("families") / name)
        return built[name]

    return get
