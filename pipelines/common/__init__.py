"""What both jobs use: option declarations (``options``), storage retries (``storage``), image and depth
decoding (``decode``), and connecting to Ray (``ray_utils``); and what the tests and benchmarks read of a
job's process tree (``processes``)."""
