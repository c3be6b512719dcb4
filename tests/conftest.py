"""Shared fixtures. Server fixtures live in their own modules and are re-exported here."""

from tests.http_target import *  # noqa: F403
