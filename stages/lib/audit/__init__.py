"""The data audit: out-of-sample probabilities from k-fold probes on cached embeddings, cleanlab's Datalab
(label issues, outliers, near copies, class imbalance), leaks across splits, galleries and suggested
corrections. Imports model, data and core."""
