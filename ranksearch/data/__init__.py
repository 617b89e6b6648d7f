"""The data a study trains on: read, label-map, split and tokenize once into an Arrow cache; SFT
examples from chats; GGUF model sources; parameter and memory estimates.

Heavy libraries (datasets, transformers) are imported inside the functions that need them, so
that `validate` and the read commands start fast; `estimate` builds models on the meta device and
imports torch at its top, so the search package imports it only where memory is checked.
"""
