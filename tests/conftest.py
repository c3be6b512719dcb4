"""Shared fixtures. Each harness module registers its own fixtures as a plugin, so a fixture is
found by pytest wherever it is defined, not by what a module chose to re-export."""

pytest_plugins = [
    "tests.daemon",
    "tests.datastores",
    "tests.http_target",
    "tests.probing",
    "tests.services",
]
