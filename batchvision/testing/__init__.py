"""Test support for batchvision: NOT part of the product.

Like ``celery.contrib.testing`` or ``flask.testing``, this package holds what the test suite
(``tests/``) and the benchmarks (``bench/``) use to run the service, never what the service
runs:

- :mod:`batchvision.testing.servers`: a private ``redis-server`` or ``rabbitmq-server``
  started, restarted and killed from Python (the processes ``batchvision up`` runs are
  described by :mod:`batchvision.cli.redis_server` and :mod:`batchvision.cli.rabbitmq_server`);
- :mod:`batchvision.testing.faultproxy`: a TCP proxy that breaks connections on purpose;
- :mod:`batchvision.testing.netns`: several hosts on one Linux machine (network namespaces).

Rules (``tests/unit/test_layout.py``): no module of ``batchvision``, ``api`` or ``workers``
imports this package; only ``tests/`` and ``bench/`` do. It may import the rest of
``batchvision`` (the CLI's supervisor included). The wheel, and so the images, leave it out
(``pyproject.toml``: ``[tool.setuptools.packages.find]``); run the tests from a checkout.
"""
