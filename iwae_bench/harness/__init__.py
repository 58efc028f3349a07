"""The benchmark harness: one cell (``cell``), the results table (``table``), the sweep loop
(``sweep``), timing (``timing``) and the machine record (``machine``). The sweep, the
pytest-benchmark runs and validate all measure through ``cell`` and write through ``table``."""
