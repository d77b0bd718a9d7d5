"""Model fusion: several models combined into one that is served like any other.

* :mod:`llmos.fusion.service` — fusions created (config, CLI, HTTP), fitted
  on dev data, registered as cards of format ``fusion``, loaded as models;
* :mod:`llmos.fusion.model` — a loaded fusion, with per-member accounting;
* :mod:`llmos.fusion.call` — one batch through a fusion, within its budget;
* :mod:`llmos.fusion.combine` — the arithmetic of the built-in strategies.

The strategies themselves are plugins (``llmos_register_fusion_strategies``);
the pure-Python ones ship as the kernel's default plugin
:mod:`llmos.default_plugins.fusion`.
"""
