"""``python -m pipelines.synthetic``: write a synthetic dataset (see ``pipelines.synthetic.main``)."""

import sys

from pipelines.synthetic import main

sys.exit(main())
