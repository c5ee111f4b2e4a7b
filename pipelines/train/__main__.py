import sys

from pipelines.train.cli import main

sys.exit(main())
