"""attnext inside other libraries' attention plug-in points.

* :mod:`attnext.integrations.transformers`: Hugging Face transformers'
  ``AttentionInterface`` (``attn_implementation="attnext"``).

Each submodule imports its library lazily; attnext itself never needs them.
"""
