"""Engine adapters for transformers models: model KV <-> chunk frames (``kvio``), a cache that fills
layer by layer (``layerwise``), bounded-memory long contexts (``longctx``) and the CPU plans that keep
the model's threads off the I/O threads' cores (``cpu_plan``). vLLM's adapter is :mod:`transfer.vllm`
(its module path is public: ``kv_connector_module_path="transfer.vllm.connector"``)."""
