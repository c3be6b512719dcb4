"""Shared fixtures. Server fixtures live in their own modules and are re-exported here."""

from tests.datastores import *  # noqa: F403
from tests.http_target import *  # noqa: F403
from tests.probing import *  # noqa: F403
from tests.services import *  # noqa: F403
