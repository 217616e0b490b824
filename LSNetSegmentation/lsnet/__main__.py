import sys

from lsnet.app.cli import main

sys.exit(main())
