"""Pure maths on activations (torch / numpy in, tensors out). Never imports `workbench`.

Submodules: pca, similarity, geometry, features, sae.
"""
