"""Every resource-id check refuses a trailing newline: ``$`` also matches before a final
"\\n", so ``re.match(r"^[a-z]+$", "digits\\n")`` succeeds; the checks end in ``\\Z``.
(The RPC fuzzer found ids like "digits\\n" stored by the pipeline and compression
services; these are the same checks in the other services.)"""

from __future__ import annotations

import pytest

from aimass.core.auth.keys import check_key_id
from aimass.core.errors import InvalidArgument
from aimass.data.store import check_id as check_dataset_id
from aimass.evaluation import monitor_store
from aimass.evaluation.store import check_dataset_version, check_version_name
from aimass.registry.names import check_id as check_model_id

CHECKS = [
    (check_model_id, "digits"),
    (check_dataset_id, "digits"),
    (check_key_id, "ci-key"),
    (monitor_store.check_id, "drift"),
    (check_version_name, "models/digits/versions/3"),
    (check_dataset_version, "datasets/digits/versions/1"),
]


@pytest.mark.parametrize(("check", "valid"), CHECKS)
def test_a_valid_id_passes_and_a_trailing_newline_is_refused(check, valid):
    assert check(valid, "field") == valid
    with pytest.raises(InvalidArgument, match="field"):
        check(valid + "\n", "field")
