"""The package exports its whole public API, sorted, and nothing else."""

from __future__ import annotations

import inspect

import pytest

import gateway.sdk
import gateway.sdk.errors
import gateway.sdk.resources


@pytest.mark.parametrize("package", [gateway.sdk, gateway.sdk.resources], ids=lambda package: package.__name__)
def test_all_is_complete_and_sorted(package) -> None:
    public = {name for name, value in vars(package).items() if not name.startswith("_") and not inspect.ismodule(value)}
    assert set(package.__all__) == public
    assert package.__all__ == sorted(package.__all__)


def test_every_error_is_exported() -> None:
    errors = {
        name
        for name, value in vars(gateway.sdk.errors).items()
        if inspect.isclass(value) and issubclass(value, gateway.sdk.HybridGatewayError)
    }
    assert errors <= set(gateway.sdk.__all__)
