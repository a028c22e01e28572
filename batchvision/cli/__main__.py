"""``python -m batchvision.cli``: the ``batchvision`` command."""

import sys

from batchvision.cli.main import main

sys.exit(main())
