import sys

from pipelines.segment.cli import main

sys.exit(main())
