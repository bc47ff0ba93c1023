"""HessianCollector: the running average 2/n X^T X over every added row, whether it accumulates the whole product (few features) or only the upper block triangle (many)."""
from __future__ import annotations

import pytest
import torch

from polyquant.calibration.stats import HessianCollector


@pytest.mark.parametrize("features", [64, 300, HessianCollector.BLOCKED_FROM])
def test_hessian_is_the_average_of_all_rows(features):
    g = torch.Generator().manual_seed(features)
    xs = [torch.randn(1, m, features, generator=g) * (1 + k) for k, m in enumerate((7, 33, 1, 20))]
    c = HessianCollector(features)
    for x in xs:
        c.add(x)
    c.add(torch.empty(0, features))  # an empty batch changes nothing
    r = c.result()
    X = torch.cat([x.reshape(-1, features) for x in xs]).double()
    ref = 2 * X.T @ X / X.shape[0]
    assert r["n"] == X.shape[0] == 61
    # the blocked form computes the upper blocks only: the lower ones must be mirrored in, not zero
    torch.testing.assert_close(r["H"].double(), r["H"].double().T, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r["H"].double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(c.result()["H"], r["H"])  # result() is idempotent
