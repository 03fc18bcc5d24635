import sys

from ras.cli.main import main

sys.exit(main())
