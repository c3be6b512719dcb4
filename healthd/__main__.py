"""``python -m healthd``."""

from healthd.cli import main

raise SystemExit(main())
