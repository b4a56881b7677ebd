"""GGUF models on llama.cpp: a server duetlm starts per model (`server.py`, `process.py`) and
the backend that talks to it (`backend.py`)."""

from duetlm.backends.llamacpp.backend import LlamaCppBackend, default_parallel

__all__ = ["LlamaCppBackend", "default_parallel"]
