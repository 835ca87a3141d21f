"""Faces: detection and cropping, the embedder network, the triplet loss and pair evaluation."""
