"""``python -m crossmoda_lib`` is the ``crossmoda`` command."""

from crossmoda_lib.cli import main

raise SystemExit(main())
