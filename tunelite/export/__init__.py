"""Model files for other runtimes: GGUF for llama.cpp and Ollama (`tunelite export gguf`)."""
