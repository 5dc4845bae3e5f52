"""loragate.adapters: PEFT LoRA adapters — parsing and validation, loading, durable storage,
and the device slot pool the engine computes with."""
