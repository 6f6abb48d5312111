"""ingrain-bento: an Ingrain-compatible model server on BentoML, in two tiers.

- ``front/``: the HTTP API (routes, wire formats, tokenizers and image preprocessing, the
  coalescing runner client), stateless, in ``INGRAIN_HTTP_WORKERS`` processes;
- ``runner/``: the model state (pool, batching, device, what to restore), one process per device;
- ``families/``: one module per model library behind the ``Family`` protocol and its registry;
- shared: ``refs`` (model identity), ``store`` (the BentoML model store), ``wire`` (what
  crosses between the tiers), ``batching``, ``schemas``, ``settings``, ``errors``, ``fetch``,
  ``media``, ``metrics``, ``machine``, ``model_list``, ``logs``, ``cli``.
"""
