"""The numbers: configs, checkpoint reading, preprocessing, the HD transform, the model and batching.

Nothing here knows about output files, manifests or engines; everything above imports from here.
"""
