"""`python -m glmstack.cli`: the `glmstack` command."""

import sys

from glmstack.cli.main import main

sys.exit(main())
