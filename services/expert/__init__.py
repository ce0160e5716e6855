"""The expert runtime: hosts experts, batches remote forward/backward calls, trains them."""
