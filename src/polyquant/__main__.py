"""``python -m polyquant``: the command line (see :mod:`polyquant.cli`)."""
from polyquant.cli import main

raise SystemExit(main())
