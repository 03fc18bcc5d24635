"""Operations: the Prometheus metrics of every daemon (``ras.ops.metrics``), their
``/metrics`` listener (``ras.ops.listener``) and its config (``ras.ops.config``), and the
farm's reports (``ras.ops.reports``). docs/operations.md says what an operator sees."""
