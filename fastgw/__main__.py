"""``python -m fastgw``: the same as the ``fastgw`` command."""

from fastgw.cli import main

raise SystemExit(main())
