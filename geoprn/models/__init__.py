"""Networks geoprn runs: base segmenters (segmentation-models-pytorch), PRN and BPR refiners."""
