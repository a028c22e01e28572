"""Peers of batchvision for bench/small_jobs.py: Ray Serve and BentoML serving the same model,
each in its own virtualenv (``make bench-peers``); :mod:`peers.launch` starts and stops them."""
