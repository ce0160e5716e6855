"""Code that more than one dmoe service uses. Nothing here imports torch at import time
except ``tensor_codec``, which only the torch-based services import."""
