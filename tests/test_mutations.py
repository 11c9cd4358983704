"""Each named mutation of benchmarks/mutations.py (a deliberate bug in a public promise) makes
the tests meant to catch it fail, in a temporary copy of the package."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mutations import MUTATIONS, run  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_named_mutation_is_killed(mutation):
    outcome = run(mutation)
    assert outcome.killed, f"{mutation.name} survived {mutation.tests}:\n{outcome.output[-3000:]}"
