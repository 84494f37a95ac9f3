"""``python -m hostlink_tw``: the hostlink-tw command."""

import sys

from hostlink_tw.cli import main

sys.exit(main())
