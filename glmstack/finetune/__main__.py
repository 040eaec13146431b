import sys

from glmstack.cli.finetune import main

sys.exit(main())
