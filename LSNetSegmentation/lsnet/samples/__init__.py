"""Sample inputs: synthetic abdominal phantoms (``phantom``) for tests, benchmarks and training smoke runs.

May import: ``lsnet.errors``, ``lsnet.io`` and the base modules.  Never: ``method``, ``seeds``,
``architectures``, ``pipeline``, ``api``, ``app``.
"""
