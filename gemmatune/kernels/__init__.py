"""Triton kernels for the Gemma 4 training path. They know nothing about models:
`gemmatune.model.patching` is the one place that wires them into a model object."""
