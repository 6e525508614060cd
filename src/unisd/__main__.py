"""`python -m unisd …` = the `unisd` console script (the commands register on `unisd.cli`, so running
`unisd/cli.py` itself as __main__ would leave them on a second copy of that module)."""

import sys

from unisd.cli import main

sys.exit(main())
