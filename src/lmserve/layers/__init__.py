"""Building blocks shared by every model family: linear layers with their weight loaders and
quantization methods, norms, rotary embeddings, activations, the gated MLP.

Families pick variants by argument (norm style, rope style and scaling, activation); they never
copy a layer to change one detail.
"""
