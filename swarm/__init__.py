"""lte-swarm's library: LoRA-the-Explorer math, quantized weights, config and the swarm protocol.

Layers point one way: the math modules (`lora`, `quant`, `lte_model`) import only torch and
bitsandbytes; the protocol modules build on them; `peers` builds on this package.
"""
