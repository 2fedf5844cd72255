"""``python -m ember.server FOLDER [options]``: the same as ``ember serve``."""
import sys

from ember.server.cli import main

sys.exit(main())
