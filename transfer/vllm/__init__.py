"""kvstore as vLLM's shared KV cache: a v1 KV connector and what it needs.

- :mod:`transfer.vllm.connector`: ``KVStoreConnector``, loaded by vLLM through
  ``kv_transfer_config`` (``kv_connector_module_path="transfer.vllm.connector"``).
- :mod:`transfer.vllm.settings`: the connector's typed settings (from
  ``kv_connector_extra_config``), its namespaces and the one function that opens
  the store client.

The bundled model as a local checkpoint vLLM loads is made on the workers' side
(:mod:`workers.vllm_checkpoint`): it needs the model code, which the client never imports.

Only ``connector`` imports vLLM; the rest works without it. See docs/vllm.md.
"""
