"""The model's linear layers: fairscale's model-parallel layers with a choice of weight format."""
