"""``python -m runtime.cli``: the same as the ``pinfer`` command."""
import sys

from runtime.cli.main import main

sys.exit(main())
