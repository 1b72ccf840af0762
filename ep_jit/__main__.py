import sys

from .cli.show_config import main

sys.exit(main())
